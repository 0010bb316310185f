"""What an evaluation reads: regression prompts, and held-out sets as arrays (from files, from a Ray
Dataset, or from the configured data sources through Ray Data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llamapro.config.eval import EvalConfig
from llamapro.data import build_eval_dataset
from llamapro.errors import EvalError
from llamapro.runtime import ensure_ray, spare_cpus

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_prompts(path, max_prompts: int = 0) -> list[dict]:
    """Regression prompts from a jsonl file: one object per line with a non-empty ``prompt``
    string; other fields (source, reference, ...) are carried into the results."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p  # the shipped default, from any working directory
    if not p.is_file():
        raise EvalError(f"regression prompt file {str(path)!r} does not exist "
                        "(eval.prompts; set it to \"\" to skip greedy agreement)")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise EvalError(f"{p}:{i}: each line must be an object with a non-empty \"prompt\" string")
        out.append(rec)
    if not out:
        raise EvalError(f"{p}: no prompts")
    return out[:max_prompts] if max_prompts else out


def as_blocks(name: str, ids, labels=None) -> dict:
    """``{"input_ids", "labels"}`` int64 arrays of one held-out set, checked (2-D, at least 2
    tokens a block, something labelled); labels default to the ids."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise EvalError(f"held-out set {name!r}: input_ids must be a non-empty 2-D array of blocks "
                        f"of at least 2 tokens, got shape {ids.shape}")
    labels = ids.copy() if labels is None else np.asarray(labels)
    if labels.shape != ids.shape:
        raise EvalError(f"held-out set {name!r}: labels shape {labels.shape} != input_ids {ids.shape}")
    if not (labels[:, 1:] != -100).any():
        raise EvalError(f"held-out set {name!r}: every label is -100; nothing to score")
    return {"input_ids": ids.astype(np.int64), "labels": labels.astype(np.int64)}


def load_heldout_file(name: str, path) -> dict:
    """A held-out set saved as arrays: ``.npz`` with ``input_ids`` (and ``labels``), or ``.jsonl``
    with one ``{"input_ids": [...], "labels": [...]}`` block per line (labels default to ids)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"held-out set {name!r}: {p} does not exist")
    if p.suffix == ".npz":
        with np.load(p) as z:
            if "input_ids" not in z:
                raise EvalError(f"{p}: no input_ids array")
            return as_blocks(name, z["input_ids"], z["labels"] if "labels" in z else None)
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{p}:{i}: not valid JSON ({e.msg})") from None
    if not rows or any(not isinstance(r, dict) or "input_ids" not in r for r in rows):
        raise EvalError(f"{p}: expected jsonl rows with input_ids (and labels)")
    try:
        ids = np.array([r["input_ids"] for r in rows], dtype=np.int64)
        labels = np.array([r.get("labels", r["input_ids"]) for r in rows], dtype=np.int64)
    except ValueError:
        raise EvalError(f"{p}: every block must have the same length") from None
    return as_blocks(name, ids, labels)


def blocks_from_dataset(ds, max_blocks: int, name: str = "held-out") -> dict:
    """The first ``max_blocks`` rows of a Ray Dataset of packed blocks as arrays."""
    rows = ds.take(max_blocks)
    if not rows:
        raise EvalError(f"held-out set {name!r} yielded no blocks (is its eval_fraction too small "
                        "for the corpus?)")
    return as_blocks(name, np.stack([np.asarray(r["input_ids"]) for r in rows]),
                     np.stack([np.asarray(r["labels"]) for r in rows]))


def heldout_from_config(data_cfg, tokenizer_path, names: list[str], max_blocks: int) -> dict:
    """Held-out blocks of each named data source, through the Ray Data pipeline."""
    known = data_cfg.source_names()
    missing = [n for n in names if n not in known]
    if missing:
        raise EvalError(f"eval sets {missing} are not data sources (configured: {known or 'none'})")
    return {n: blocks_from_dataset(build_eval_dataset(data_cfg, tokenizer_path, n), max_blocks, n)
            for n in names}


def heldout_sets(cfg, ckpt, heldout: dict | None = None, say=None) -> dict:
    """The held-out sets ``cfg.eval`` asks for: ``heldout`` (arrays) if given, else the data
    sources' held-out splits through Ray Data (a local Ray is started when none is running and
    RAY_ADDRESS is unset); at most eval.max_blocks blocks each."""
    say = say or (lambda m: None)
    ec: EvalConfig = cfg.eval
    if heldout is None:
        data = getattr(cfg, "data", None)
        available = [s.name for s in (data.sources if data else []) if s.eval_fraction > 0]
        names = ec.set_names(available)
        known = data.source_names() if data else []
        if [n for n in names if n not in known]:  # before starting Ray for nothing
            raise EvalError(f"held-out sets {[n for n in names if n not in known]} have no held-out "
                            f"data: give them as arrays (--heldout NAME=PATH) or configure data "
                            f"sources of those names (configured: {known or 'none'})")
        if names:
            say(f"held-out blocks of {names} through Ray Data")
            started = ensure_ray("eval", num_cpus=spare_cpus(), include_dashboard=False,
                                 log_to_driver=False, quiet_data=True)
            try:
                heldout = heldout_from_config(data, str(ckpt), names, ec.max_blocks)
            finally:
                if started:
                    import ray

                    ray.shutdown()
        else:
            heldout = {}
    else:
        heldout = {n: {k: np.asarray(v)[:ec.max_blocks] for k, v in b.items()} for n, b in heldout.items()}
    if ec.sets:
        unknown = [n for n in ec.sets if n not in heldout]
        if unknown:
            raise EvalError(f"eval.sets {unknown} have no held-out data (available: {sorted(heldout)})")
        heldout = {n: heldout[n] for n in ec.sets}
    return heldout


def replayed_sources(cfg) -> dict[str, bool]:
    """Which data sources the training mixture replays: weight > 0 (trained on), weight 0 (held
    out entirely: a set of those measures forgetting)."""
    data = getattr(cfg, "data", None)
    return {s.name: s.weight > 0 for s in (data.sources if data else [])}

