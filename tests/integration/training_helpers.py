"""What the training integration tests share: learnable data, the run's records and tensors, and
the faults a worker provokes in itself at a checkpoint (a SIGKILL, a full disk).

The faults ride on ``run_training(report_metrics=...)``: a function every worker calls at each
checkpoint, just before writing it. The ones here are built by factories (nested functions, so Ray
pickles them by value: a worker never has to import this module) and act only at the step and on
the rank they are told, once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

SEQ = 32


def rows(n: int, seed: int, seq: int = SEQ) -> list[dict]:
    """Counting sequences mod a small vocabulary: learnable, so loss must fall."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(3, 60))
        ids = np.array([(start + j) % 100 + 3 for j in range(seq)], dtype=np.int64)
        out.append({"input_ids": ids, "labels": ids.copy()})
    return out


def eval_set(rs: list[dict]) -> dict:
    return {"input_ids": [r["input_ids"].tolist() for r in rs], "labels": [r["labels"].tolist() for r in rs]}


def data(ray, n: int = 256, ordered: bool = False):
    """The training stream and the held-out sets: ``domain`` (16 rows) and ``one-row`` (fewer rows
    than workers: still scored, it used to read 0.0 on every rank)."""
    ds = ray.data.from_items(rows(n, 0))
    if ordered:
        ds.context.execution_options.preserve_order = True  # what data.preserve_order sets
    ev = rows(16, 1)
    return ds, {"domain": eval_set(ev), "one-row": eval_set(ev[:1])}


def events(out, kind: str) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def tensors(d) -> dict:
    sd = {}
    for f in Path(d).glob("*.safetensors"):
        sd.update(load_file(f))
    return sd


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def only_layers(names: set[str], *layers: int) -> bool:
    """Something changed, and only inside the given decoder layers."""
    return bool(names) and all(k.startswith(tuple(f"model.layers.{i}." for i in layers)) for k in names)


def registered_steps(storage: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (persisted in its snapshot)."""
    try:
        d = json.loads((Path(storage) / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["metrics"]["step"] for r in d.get("checkpoint_results", [])]


def kill_at_checkpoint(step: int, rank: int, storage: Path, registered: int, marker: Path):
    """A ``report_metrics`` hook: worker ``rank`` SIGKILLs itself when it is about to write the
    checkpoint of ``step``, once Ray Train has registered the one of step ``registered`` (so that
    one is what a restart must resume from). ``marker`` makes it happen once: a restarted group
    goes on."""

    def hook(metrics: dict) -> dict:
        import json as _json
        import os
        import signal
        import time

        import ray.train

        if (metrics.get("step") != step or ray.train.get_context().get_world_rank() != rank
                or marker.exists()):
            return {}
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                snap = _json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
                if registered in [r["metrics"]["step"] for r in snap["checkpoint_results"]]:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
        return {}

    return hook


def train(ray, expanded: Path, name: str, ordered: bool = False, model: str = "exp", **kw):
    """One ``run_training`` of ``expanded/model`` into ``expanded/name`` (Ray Train's storage in
    ``expanded/name/ray``) on :func:`data`; returns the run directory and Ray Train's result."""
    from llamapro.config.train import TrainConfig
    from llamapro.training import run_training

    run_kw = {k: kw.pop(k) for k in ("report_metrics", "storage_path") if k in kw}
    ds, ev = data(ray, ordered=ordered)
    tc = TrainConfig(**{"max_steps": 8, "lr": 3e-3, "micro_batch_size": 4, "eval_every": 4,
                        "checkpoint_every": 4, **kw})
    out = Path(expanded) / name
    res = run_training(tc, str(Path(expanded) / model), str(out), ds, ev, seq_len=SEQ, name=name, **run_kw)
    return out, res


# The ZeRO-3 run the resume faults are compared with (conftest's zero3_reference): one worker and an
# ordered stream, so a resumed run sees exactly the micro-batches the uninterrupted one saw.
ZERO3 = {"max_steps": 10, "lr": 3e-3, "micro_batch_size": 4, "eval_every": 100, "checkpoint_every": 2,
         "keep_checkpoints": 10, "max_failures": 0, "zero_stage": 3, "num_workers": 1}


def after_resume(run: Path) -> list[dict]:
    """The step records the resumed attempt wrote (those after its ``resume`` record)."""
    recs = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(recs) if e["event"] == "resume"]
    return [e for e in recs[starts[-1]:] if e["event"] == "step"] if starts else []


def assert_resumed_exactly(reference: Path, run: Path, from_step: int) -> None:
    """``run`` resumed once, at ``from_step``, and went on as the uninterrupted ``reference`` did:
    past the micro-batches trained on, same losses and learning rates (optimizer and scheduler
    restored, not restarted), same trained model."""
    import pytest

    (resume,) = events(run, "resume")
    assert resume["step"] == from_step
    ref = {e["step"]: e for e in events(reference, "step")}
    ran = after_resume(run)
    assert [e["step"] for e in ran] == list(range(from_step + 1, max(ref) + 1))
    for e in ran:
        r = ref[e["step"]]
        assert abs(e["loss"] - r["loss"]) <= 1e-5 * max(1.0, r["loss"]), (e["step"], e["loss"], r["loss"])
        assert e["lr"] == pytest.approx(r["lr"])
    assert [e["micro_batches_per_worker"] for e in events(run, "data_skip")] == [from_step]
    assert [s["zero_stage"] for s in events(run, "stage_start")][-1] == 3
    want, got = tensors(reference / "model"), tensors(run / "model")
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
