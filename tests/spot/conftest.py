import sys
from pathlib import Path

# The daemon harness (and the probe services it plugs in) live in tests/daemon.
sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))

from daemon_harness import agent_factory

__all__ = ["agent_factory"]
