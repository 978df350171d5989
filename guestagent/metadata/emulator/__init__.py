"""guestagent.metadata.emulator."""
