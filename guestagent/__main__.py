"""``python -m guestagent``."""

import sys

from guestagent.cli import main

sys.exit(main())
