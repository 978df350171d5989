"""guestagent: the in-instance agent for custom ECS images, and its local cloud."""

__version__ = "0.1.0"
