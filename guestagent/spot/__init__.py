"""guestagent.spot."""
