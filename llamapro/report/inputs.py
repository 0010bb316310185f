"""What a report reads: the training events of ``RUN/metrics.jsonl``, the run's layout, and the
facts derived from them and the checkpoint's metadata (training summary, the layer table)."""

from __future__ import annotations

import statistics
from pathlib import Path

from llamapro.artifacts import ExpansionMetadata, RunLayout, TrainingRecord
from llamapro.jsonl import read_records


def read_events(run_dir) -> list[dict]:
    """The training events of ``RUN/metrics.jsonl`` (records with an ``event``; unreadable lines
    skipped); [] when there is none."""
    return [e for e in read_records(RunLayout(run_dir).metrics) if "event" in e]


def step_events(events, kind="step") -> list[dict]:
    """The events of one kind (``step``, ``eval``) in step order; a resumed run's repeated steps
    are kept once, the last one."""
    by = {}
    for e in events:
        if e.get("event") == kind and "step" in e:
            by[e["step"]] = e
    return [by[k] for k in sorted(by)]


def locate_run(run_dir: Path) -> tuple[Path, Path | None]:
    """(the directory to report on, its checkpoint or None). Unlike :func:`llamapro.artifacts.locate`
    a bare checkpoint is its own home (its events, results and report beside it) and a directory
    without a model is still reported on (everything "not recorded")."""
    layout = RunLayout(run_dir)
    if (layout.model / "config.json").is_file():
        return run_dir, layout.model
    if (run_dir / "config.json").is_file():
        return run_dir, run_dir
    return run_dir, None


def summarize(events: list[dict], meta: dict | None) -> dict:
    """Tokens, time, throughput and peak memory of the training run."""
    training = ExpansionMetadata.of(meta or {}).training or TrainingRecord()
    steps = step_events(events)
    tokens = training.tokens or (steps[-1].get("tokens") if steps else None)
    seconds = training.train_seconds or (sum(s.get("step_s", 0) for s in steps) or None)
    rates = [s["tokens_per_s"] for s in steps if isinstance(s.get("tokens_per_s"), (int, float))]
    peaks = [e["peak_rss_bytes"] for e in events if isinstance(e.get("peak_rss_bytes"), (int, float))]
    return {
        "steps": training.steps or (steps[-1]["step"] if steps else None),
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": (tokens / seconds) if tokens and seconds else None,
        "median_step_tokens_per_s": statistics.median(rates) if rates else None,
        "peak_rss_bytes": max(peaks) if peaks else None,
        "resumes": sum(1 for e in events if e.get("event") == "resume"),
        "early_stopped_stages": training.early_stopped_stages
        or sorted({e.get("stage") for e in events if e.get("event") == "early_stop"}),
    }


def layer_table(meta: dict | None) -> list[dict]:
    """One row per layer of the stack: index, new or original, source/original index, stage."""
    meta = ExpansionMetadata.of(meta)
    if not meta or not meta.num_layers:
        return []
    new = {int(i) for i in meta.new_layer_indices}
    sources = {int(k): v for k, v in meta.new_layer_sources.items()}
    stage_of = {}
    for st in (meta.training or TrainingRecord()).stages:
        for layer in st.get("layers") or []:
            stage_of.setdefault(int(layer), st.get("index", 0))
    rows, o = [], 0
    for i in range(int(meta.num_layers)):
        if i in new:
            rows.append({"index": i, "new": True, "source": sources.get(i), "stage": stage_of.get(i)})
        else:
            rows.append({"index": i, "new": False, "original": o})
            o += 1
    return rows
