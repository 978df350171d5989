"""guestagent.credentials."""
