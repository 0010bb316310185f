"""llamapro.publish."""
