import sys
from pathlib import Path

# The probe services (and their ``events`` reader) live in tests/daemon; the agent_factory
# fixture comes from tests/fixtures/agent.py.
sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))
