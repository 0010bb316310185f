"""The base an evaluation compares with: chosen from the checkpoint's metadata (the trained model
with its inserted blocks skipped, or a base directory), made available next to the trained model,
and the rollback check (strip the inserted blocks: is that the base again?)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from llamapro.artifacts import ExpansionMetadata, TrainingRecord
from llamapro.config.eval import EvalConfig
from llamapro.errors import EvalError
from llamapro.expansion.api import strip


def resolve_base(checkpoint: Path, meta: dict | None, cfg: EvalConfig) -> dict:
    """How the base is obtained: ``{"mode": "skip"|"path", "path", "exact", "why"}``."""
    meta = ExpansionMetadata.of(meta or {})
    new_idx = list(meta.new_layer_indices)
    training = meta.training or TrainingRecord()
    # an expanded checkpoint never trained has its originals as they were; a recorded null is False
    frozen = bool(training.originals_frozen if "originals_frozen" in training else meta.kind == "expanded")
    recorded = meta.base_path
    if not new_idx and training.trained_from:
        recorded = recorded or training.trained_from  # a baseline run: trained from the base
    explicit = cfg.base or None
    skip_ok = bool(new_idx)
    if cfg.base_mode == "skip" or (cfg.base_mode == "auto" and not explicit and skip_ok and frozen):
        if not skip_ok:
            raise EvalError(f"{checkpoint} records no inserted layers: eval.base_mode=skip has "
                            "nothing to skip; give eval.base")
        return {"mode": "skip", "path": None, "exact": frozen,
                "why": "the trained model with its inserted blocks skipped"
                       + (" (originals frozen: exactly the base)" if frozen else
                          " (originals were trained: NOT exactly the base)")}
    path = explicit or recorded
    if path and Path(path).is_dir():
        return {"mode": "path", "path": str(path), "exact": True,
                "why": f"the base loaded from {path}"}
    if explicit or cfg.base_mode == "path":
        raise EvalError(f"base model {path!r} is not a directory (eval.base / eval.base_mode=path)")
    if skip_ok:
        return {"mode": "skip", "path": None, "exact": frozen,
                "why": f"the trained model with its inserted blocks skipped (base path "
                       f"{path!r} not found{'' if frozen else '; originals were trained, so NOT exactly the base'})"}
    raise EvalError(f"no base model to compare {checkpoint} with: {path!r} is not a directory. "
                    "Pass --base (eval.base).")


class BasePair:
    """The trained model, and a context manager that makes the base available."""

    def __init__(self, trained, new_idx, base_model=None):
        self.trained, self.new_idx, self.base_model = trained, list(new_idx), base_model

    @contextlib.contextmanager
    def base(self):
        if self.base_model is not None:
            yield self.base_model
        else:
            from llamapro.expansion.surgery import skip_layers  # local: it imports torch

            with skip_layers(self.trained, self.new_idx) as m:
                yield m


def rollback_check(checkpoint: Path, meta: dict, scratch: Path) -> dict:
    """Strip the inserted blocks into a scratch directory: does that give back the base exactly
    (its recorded fingerprint)?"""
    if not ExpansionMetadata.of(meta or {}).new_layer_indices:
        return {"applicable": False, "equals_base": False,
                "note": "no inserted blocks recorded: nothing to strip (a baseline run)"}
    tmp = Path(tempfile.mkdtemp(prefix=".rollback-check-", dir=scratch))
    try:
        r = strip(str(checkpoint), str(tmp / "stripped"), progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"applicable": True, "equals_base": bool(r["equals_base"]),
            "base_fingerprint": r["base_fingerprint"], "stripped_fingerprint": r["fingerprint"],
            "removed_layers": r["removed_layers"]}
