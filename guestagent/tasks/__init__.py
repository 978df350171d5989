"""guestagent.tasks."""
