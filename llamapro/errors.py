"""Exceptions shared by the pure config modules (kept apart so section modules can import them
without importing the config tree)."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and how to fix it."""


class TrainingError(RuntimeError):
    """Training failed inside the Ray Train workers (after any restarts it was allowed); the
    message carries each failed worker's own error line, not Ray's wrapper traceback."""
