"""The driver side of training: :func:`run_training` checks the inputs, builds Ray Train's
``TorchTrainer`` (scaling, failure and checkpoint policy) around the worker's ``train_loop``, turns
a failed fit into one :class:`~llamapro.errors.TrainingError`, and fetches a remote run's output.
While the fit runs, a command's console shows the run's progress, printed here from the records
the workers append to ``metrics.jsonl`` (:mod:`llamapro.training.progress`)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

from llamapro import runtime, storage
from llamapro.artifacts import METADATA_FILE, read_metadata
from llamapro.config.train import TrainConfig
from llamapro.errors import LlamaproError, TrainingError
from llamapro.expansion.api import require_proven
from llamapro.training.progress import WORKER_LINES_REPLACED, MetricsTail, Progress, schedule_steps
from llamapro.training.worker import train_loop


def _training_failure(e, tc: TrainConfig, storage_dir: str, name: str) -> str:
    """One readable paragraph for a failed fit: each worker's own last error line."""
    failures = getattr(e, "worker_failures", None) or {}
    lines = []
    for rank, err in sorted(failures.items()):
        last = [l for l in str(err).strip().splitlines() if l.strip()]
        lines.append(f"  worker {rank}: {type(err).__name__}: {last[-1] if last else ''}")
    if not lines:
        last = [l for l in str(e).strip().splitlines() if l.strip()]
        lines.append(f"  {last[-1] if last else type(e).__name__}")
    return (f"training failed (after up to {tc.max_failures} restart(s) of the worker group):\n"
            + "\n".join(lines) + f"\nRay Train's logs and checkpoints: {storage_dir}/{name}; once the "
            "cause is fixed, the same command resumes from the latest checkpoint")


@contextlib.contextmanager
def _progress(show: bool | None, tc: TrainConfig, new_layers, seq_len: int, out: Path, out_uri):
    """The progress lines while the block runs (nothing when not shown). Rank 0 appends to
    ``out/metrics.jsonl``; behind a URI it works in its node's copy of the run
    (``storage.local_dir(out_uri)``), which is this node's when rank 0 runs here. Once records
    arrive here, the workers' own step lines stay in the log file; until then (rank 0 on another
    node) they are what the screen shows."""
    sink = runtime.active_log_file()
    if not (show if show is not None else sink is not None):
        yield
        return
    if sink is not None:
        sink.attach_workers()  # idempotent: Ray may have been started by a Ray Data call

    def quiet_workers():
        if sink is not None:
            sink.quiet = WORKER_LINES_REPLACED
    path = (storage.local_dir(out_uri) if out_uri else out) / "metrics.jsonl"
    try:
        plan = schedule_steps(tc, new_layers, seq_len)
    except LlamaproError:  # a schedule the workers refuse: they say why; the stage_start records fill in
        plan = [0] * max(1, tc.num_stages)
    try:
        with MetricsTail(path, Progress(plan), on_first=quiet_workers):
            yield
    finally:
        if sink is not None:
            sink.quiet = ()


def run_training(tc: TrainConfig, model_dir: str, out_dir: str, train_ds, eval_sets: dict | None = None,
                 seq_len: int = 256, name: str = "train", seed: int = 0, early_stop_on: str | None = None,
                 trust_remote_code: bool = False, storage_path: str | None = None,
                 callbacks: list | None = None, report_metrics=None, model_uri: str | None = None,
                 out_uri: str | None = None, progress: bool | None = None):
    """Train and return the Ray Train ``Result``; the trained HF checkpoint lands in
    ``out_dir/model`` and per-step metrics in ``out_dir/metrics.jsonl``.

    ``eval_sets`` maps a held-out set's name to ``{"input_ids": [[...]], "labels": [[...]]}``
    (small and fixed, so every evaluation sees the same tokens). Rerunning with the same ``name``
    and ``storage_path`` resumes from the latest checkpoint.

    Without a file system shared by every node, give URIs (``s3://``, ``gs://``, ``file://``):
    ``model_uri`` is the same checkpoint as ``model_dir`` (the driver's local copy), and each
    worker downloads it to its own node; rank 0 works in its node's copy of ``out_uri`` and
    uploads the metrics (at every checkpoint) and the final model there, and the driver then
    fetches both into ``out_dir``.

    ``progress``: print a progress line per step (at most one every few seconds) while training;
    None: when a command's Ray log file is active (``runtime.ray_log_file``: ``llamapro run`` /
    ``train``), so library callers and Tune trials keep their output as it was.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(Path(model_dir))
    new_layers = sorted(meta.new_layer_indices) if meta else []
    if tc.mode == "llamapro":  # library callers too: never train an expansion whose proof did not pass
        require_proven(meta, tc.allow_unproven, str(model_dir))
    if tc.mode == "llamapro" and not new_layers:
        raise ValueError(
            f"{model_dir} records no inserted layers (no {METADATA_FILE} from `llamapro expand`); "
            "train mode llamapro needs an expanded checkpoint, or use mode full/lora/freeze_last_n")
    empty = [k for k, v in (eval_sets or {}).items() if not len(v["input_ids"])]
    if empty:
        raise ValueError(f"held-out set(s) {empty} have no rows: a loss over nothing would read as 0.0 "
                         "and drive early stopping; give them data or leave them out")
    config = {"train": asdict(tc), "model_dir": str(Path(model_dir).resolve()), "out_dir": str(out),
              "new_layers": new_layers, "seq_len": seq_len, "seed": seed,
              "eval_sets": eval_sets or {}, "early_stop_on": early_stop_on,
              "trust_remote_code": trust_remote_code, "model_uri": model_uri, "out_uri": out_uri,
              "report_metrics": report_metrics}
    storage_dir = storage_path or str(out / "ray")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_dir,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=callbacks),  # e.g. Tune's TuneReportCallback (llamapro.tune)
        datasets={"train": train_ds},
    )
    try:
        with _progress(progress, tc, new_layers, seq_len, out, out_uri):
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # Train V2 raises instead of returning result.error
        raise TrainingError(_training_failure(e, tc, storage_dir, name)) from e
    if out_uri and result.error is None:  # rank 0 may have run on another node
        for rel in ("model", "metrics.jsonl"):
            storage.download(storage.join(out_uri, rel), out / rel)
    return result
