"""llamapro.expand."""
