"""Images: build a root file system with the agent baked in, and ``deprovision`` one
before it is captured as an image (the instance's own state removed)."""
