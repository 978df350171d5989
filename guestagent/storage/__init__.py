"""guestagent.storage."""
