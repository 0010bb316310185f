"""Every exception llamapro raises on purpose, each carrying the exit code the CLI returns for it.

The CLI (:func:`llamapro.cli.main`) maps an exception to its exit code by ``exit_code`` alone;
library users catch :class:`LlamaproError` (or a narrower class). Each class keeps the builtin base
it always had (``ValueError`` for bad input, ``RuntimeError`` for failures), so code that catches
those keeps working. This module imports nothing from llamapro: every layer may import it.

Exit codes: 0 ok, 1 a failure while running, 2 bad input (nothing was written), 3 the identity
proof failed, 4 a regression gate failed, 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_IDENTITY = 3
EXIT_GATE_FAILED = 4
EXIT_INTERRUPTED = 130


class LlamaproError(Exception):
    """Base of every deliberate llamapro error; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_ERROR


class BadInputError(LlamaproError):
    """Input that cannot work (config, paths, models, requests); nothing was written. Exit 2."""

    exit_code = EXIT_BAD_INPUT


# --- configuration --------------------------------------------------------------------------------

class ConfigError(BadInputError, ValueError):
    """A config that cannot run; the message names the key and how to fix it."""


class ScheduleError(BadInputError, ValueError):
    """A training schedule (stages, ratios, steps) that cannot run."""


# --- models, checkpoints, expansion ----------------------------------------------------------------

class CheckpointError(BadInputError, ValueError):
    """A checkpoint that cannot be read or written as asked; the message says why and what to do."""


class IncompleteUploadError(CheckpointError):
    """A directory at a URI is not a complete upload (interrupted, or changed since)."""


class UnsupportedModelError(BadInputError, ValueError):
    """The model cannot be expanded into an exact identity (or we cannot prove that it can)."""


class PlacementError(BadInputError, ValueError):
    """An impossible or malformed placement request."""


class IdentityError(LlamaproError, RuntimeError):
    """The expanded model does not compute what the base computed. Exit 3."""

    exit_code = EXIT_IDENTITY


class UnprovenError(CheckpointError):
    """Training was asked to start from an expansion whose identity proof failed or never ran."""


# --- data -----------------------------------------------------------------------------------------

class DataError(BadInputError, RuntimeError):
    """A corpus that cannot feed a run: the message names the source, the path or the reasons."""


class DataPathError(DataError, FileNotFoundError):
    """A configured path that matches nothing."""


class CorpusError(BadInputError, RuntimeError):
    """A demo corpus cannot be built here; the message says what to install."""


# --- training -------------------------------------------------------------------------------------

class TrainingError(LlamaproError, RuntimeError):
    """Training failed inside the Ray Train workers (after any restarts it was allowed); the
    message carries each failed worker's own error line, not Ray's wrapper traceback. Exit 1."""


class QuantizeError(BadInputError, ValueError):
    """``quantize_base`` cannot be applied (bad value, missing package, nothing to train)."""


# --- evaluation -----------------------------------------------------------------------------------

class EvalError(BadInputError, ValueError):
    """Evaluation input that cannot work (missing set, bad prompt file, no base); exit code 2."""


class LmEvalUnavailable(EvalError):
    """lm-evaluation-harness was asked for but is not installed."""


class BatteryError(BadInputError, ValueError):
    """Battery data that cannot be used (missing, malformed); the message says what and how to fix."""


class CompareError(BadInputError, ValueError):
    """Bad input to ``llamapro compare`` (a missing run, a label twice); exit code 2."""


class GateFailed(LlamaproError):
    """A regression gate failed (the model learned, but broke what it must keep). Exit 4."""

    exit_code = EXIT_GATE_FAILED


# --- publishing -----------------------------------------------------------------------------------

class FuseError(CheckpointError):
    """Input fusion cannot work with; exit code 2, nothing written."""


class NoAlphaPassesGate(GateFailed, RuntimeError):
    """alpha=auto: no alpha of the grid passes the regression gate; exit code 4, nothing written."""

    def __init__(self, message: str, curve: list[dict]):
        super().__init__(message)
        self.curve = curve


class PackError(CheckpointError):
    """A pack that cannot be made, read or applied as asked; the message says why and what to do."""


class GGUFExportError(CheckpointError):
    """The model, tokenizer or quant type cannot be written as GGUF (nothing was written)."""


class QuantExportError(CheckpointError):
    """A quantized export this machine or install cannot produce (nothing was written)."""


# --- serving --------------------------------------------------------------------------------------

class ServeLLMError(BadInputError, RuntimeError):
    """Ray Serve LLM cannot run here (no GPU / vLLM) or the request to build it is wrong."""


def exit_code_of(e: BaseException) -> int | None:
    """The exit code for a deliberate llamapro error, None for anything else (a bug: let it raise)."""
    return e.exit_code if isinstance(e, LlamaproError) else None
