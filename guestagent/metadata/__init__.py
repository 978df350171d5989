"""guestagent.metadata."""
