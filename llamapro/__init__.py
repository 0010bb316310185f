"""llamapro: LLaMA-Pro block expansion with proven function preservation, trained on Ray."""

__version__ = "0.1.0"
