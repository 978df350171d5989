from daemon_harness import agent_factory

__all__ = ["agent_factory"]
