"""Exceptions shared by the pure config modules (kept apart so section modules can import them
without importing the config tree)."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and how to fix it."""
