"""guestagent.userdata."""
