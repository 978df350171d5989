"""guestagent.migrate."""
