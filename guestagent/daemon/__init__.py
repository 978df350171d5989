"""guestagent.daemon."""
