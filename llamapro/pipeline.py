"""The steps of a run, one function per step, each doing its own storage sync: what `llamapro
<step>`, `llamapro run`, ``jobs/`` and the Python API (``import llamapro``) call.

Every step reads and writes plain directories under ``<run.output_dir>/<run.name>/``::

    expanded/          expand_step: llamapro expand (+ proof in llamapro.json)
    model/             train_step: the trained HF checkpoint; metrics.jsonl; config.yaml; ray/
    eval/ report/      eval_step: results.json, report.{md,html} + PNGs
    export/            export_step: a clean HF directory with a model card
    fused/ fusion/     fuse_step: one fused HF model; the alpha curve
    pack/              pack_step: the new blocks as a pack for the base
    baseline-<mode>/   the same for a baseline (full, lora, freeze_last_n) on the unexpanded base

A run directory may be a URI (``s3://``, ``gs://``, ``file://``): each step then works in a local
copy, downloads what it reads (the ``*_PULL`` lists below) and uploads what it writes, and Ray
Train checkpoints go straight to ``<run dir>/ray`` behind the URI, so a run's steps and its Train
workers may run on different nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import posixpath
from pathlib import Path

from llamapro import runtime, storage
from llamapro.errors import CheckpointError, ConfigError, TrainingError

log = logging.getLogger(__name__)

# What each step downloads from a run directory behind a URI, and what it uploads there.
EVAL_PULL, EVAL_PUSH = ["model", "metrics.jsonl", "config.yaml"], ["eval", "report"]
EXPORT_PULL = ["model", "eval", "config.yaml"]
FUSE_PULL, FUSE_PUSH = ["model", "eval", "metrics.jsonl", "config.yaml"], ["fusion", "report"]
PACK_PULL = ["model", "metrics.jsonl", "config.yaml"]


def ensure_ray(cfg=None) -> None:
    """Connect to the cluster of a Ray job (RAY_ADDRESS), or start the embedded local one.

    Locally we declare more logical CPUs than Train takes: with every CPU held by a Train worker,
    Ray Data's tokenizer actors never start and nothing errors.
    """
    want, custom = 4, {}
    if cfg is not None:
        t = cfg.train
        want = max(want, t.num_workers * t.cpus_per_worker + int(cfg.data.actors * cfg.data.cpus_per_actor) + 1)
        # the one local node is where the tokenizer actors' custom resources must be
        custom = {k: v * cfg.data.actors for k, v in cfg.data.actor_resources.items()}
    # keep the dashboard (Ray's default): Train V2 cleans up placement groups through its State API
    runtime.ensure_ray("train", num_cpus=want, resources=custom or None)


def run_dir(cfg) -> Path:
    """The run directory this process works in (a local copy when run.output_dir is a URI)."""
    return storage.local_dir(cfg.run.run_dir())


def expanded_dir(cfg) -> Path:
    """Where the expand step writes (``RUN/expanded``, in the local copy of a URI run)."""
    return run_dir(cfg) / "expanded"


def base_model_dir(cfg) -> str:
    """The base model as a local directory: demo:NAME converted once, a URI downloaded once."""
    from llamapro.demo import resolve_model

    return resolve_model(storage.localize(cfg.model.base))


def expand_step(cfg, force: bool = True, progress: bool = True) -> dict:
    """Expand ``model.base`` into ``RUN/expanded`` as the ``expand`` section says and prove the
    identity (``llamapro expand`` from a config); uploads ``expanded/`` for a URI run. Returns the
    metadata written to ``llamapro.json``."""
    from llamapro.expansion import api as steps

    with storage.synced(cfg.run.run_dir(), push=["expanded"]):
        return steps.expand(base_model_dir(cfg), str(expanded_dir(cfg)), blocks=cfg.expand.blocks,
                            strategy=cfg.expand.strategy, positions=cfg.expand.positions or None,
                            residual_writers=cfg.expand.residual_writers or None,
                            verify=cfg.expand.verify, force=force,
                            trust_remote_code=cfg.model.trust_remote_code, progress=progress)


def eval_blocks(cfg, model_dir: str, per_source: int) -> dict:
    """A small, fixed set of held-out blocks per source (same tokens at every evaluation)."""
    from llamapro.data import build_eval_dataset, load_tokenizer

    tok = load_tokenizer(model_dir)  # once: loading costs seconds
    out = {}
    for src in cfg.data.sources:
        if src.eval_fraction <= 0:
            continue
        rows = build_eval_dataset(cfg.data, tok, src.name).take(per_source)
        if not rows:
            log.warning("source %s has no held-out blocks; raise its eval_fraction", src.name)
            continue
        out[src.name] = {"input_ids": [list(map(int, r["input_ids"])) for r in rows],
                         "labels": [list(map(int, r["labels"])) for r in rows]}
    return out


def train_config_for(cfg, mode: str | None = None):
    """The train section a run of ``mode`` uses: the config's own (None, llamapro), or a baseline
    derived from it (same budget, one stage) at its own LR from ``run.baseline_lrs`` if named."""
    from llamapro.config.train import baseline_of

    tc = cfg.train if mode is None else baseline_of(cfg.train, mode)
    if mode is not None and mode in cfg.run.baseline_lrs:
        tc = dataclasses.replace(tc, lr=float(cfg.run.baseline_lrs[mode]))
    return tc


def train_step(cfg, mode: str | None = None) -> dict:
    """Train the expanded model (mode llamapro) or a baseline on the base; returns a summary."""
    tc = train_config_for(cfg, mode)
    sub = "" if tc.mode == "llamapro" else f"baseline-{tc.mode}"
    outputs = [posixpath.join(sub, f) for f in ("model", "metrics.jsonl", "config.yaml")]
    with storage.synced(cfg.run.run_dir(), pull=["expanded"] if not sub else [],
                        push=outputs) as rd:
        return _train(cfg, tc, rd / sub if sub else rd,
                      storage.train_storage_path(cfg.run.run_dir(), posixpath.join(sub, "ray")), sub)


def _uris(cfg, tc, sub: str) -> tuple[str | None, str | None]:
    """For a run directory behind a URI: where Train workers on any node find the model they
    start from, and where rank 0 puts what it writes. (A local run dir is assumed to be a path
    every node sees, such as an NFS or PVC mount, or a one-node cluster.)"""
    rd = cfg.run.run_dir()
    if not storage.is_uri(rd):
        return None, None
    if tc.mode == "llamapro":
        model_uri = storage.join(rd, "expanded")
    else:  # a baseline starts from the base: a URI is shared; a local path or hub id must resolve on every node
        model_uri = cfg.model.base if storage.is_uri(cfg.model.base) else None
    return model_uri, storage.join(rd, sub) if sub else rd


def _train(cfg, tc, out: Path, storage_path: str | None, sub: str) -> dict:
    from llamapro.data import build_train_dataset
    from llamapro.training import run_training

    if tc.mode == "llamapro":
        model_dir = expanded_dir(cfg)
        if not (model_dir / "llamapro.json").is_file():
            log.info("no expanded checkpoint at %s yet: expanding first", model_dir)
            expand_step(cfg)
        from llamapro.artifacts import read_metadata
        from llamapro.expansion.api import require_proven

        require_proven(read_metadata(model_dir), tc.allow_unproven, where=str(model_dir))
    else:
        model_dir = Path(base_model_dir(cfg))
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: configure at least one corpus to train on")
    ensure_ray(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # the resolved config beside the run: lineage for the model card (data mixture, stages)
    import yaml

    from llamapro.config import to_dict

    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    from llamapro.data import load_tokenizer

    train_ds = build_train_dataset(cfg.data, load_tokenizer(str(model_dir)))
    per = tc.eval_batches * tc.micro_batch_size * tc.num_workers
    evals = eval_blocks(cfg, str(model_dir), per)
    early = tc.early_stop_on or (cfg.data.sources[0].name if cfg.data.sources else None)
    result = run_training(tc, str(model_dir), str(out), train_ds, evals, seq_len=cfg.data.seq_len,
                          name=f"{cfg.run.name}-{tc.mode}", seed=cfg.run.seed, early_stop_on=early,
                          trust_remote_code=cfg.model.trust_remote_code, storage_path=storage_path,
                          **dict(zip(("model_uri", "out_uri"), _uris(cfg, tc, sub))))
    if result.error is not None:
        raise TrainingError(f"training failed: {result.error}")
    return {"out": str(out), "model": str(out / "model"), "metrics": result.metrics}


@contextlib.contextmanager
def _working_copy(source: str, out: str | None, default: str, pull, push):
    """``(local source, local out)`` for a step that reads the run (or checkpoint) ``source`` and
    writes ``out`` (default: ``default`` inside the run). A local path is used in place. A run
    behind a URI is worked on in a local copy: ``pull`` downloaded first, ``push`` (and ``out``,
    when it lies inside the run) uploaded when the block succeeds; an ``out`` URI elsewhere is
    written locally and uploaded after. A URI with no ``model/`` is a checkpoint, read whole."""
    out = str(out) if out else storage.join(source, default)
    if not storage.is_uri(source):
        with _upload_after(out) as local_out:
            yield Path(source), local_out
        return
    if not storage.exists(storage.join(source, "model")):  # a checkpoint, not a run directory
        if not storage.exists(source):
            raise CheckpointError(f"{source} does not exist")
        with _upload_after(out) as local_out:
            yield Path(storage.localize(source)), local_out
        return
    prefix = source.rstrip("/") + "/"
    rel = out[len(prefix):] if out.startswith(prefix) else None  # out inside the run: pushed with it
    with storage.synced(source, pull=pull, push=[*push, *([rel] if rel else [])]) as run:
        if rel:
            yield run, run / rel
        else:
            with _upload_after(out) as local_out:
                yield run, local_out


@contextlib.contextmanager
def _upload_after(out: str):
    """The local directory a step writes ``out`` to; uploaded when the block succeeds if ``out``
    is a URI."""
    local = storage.local_dir(out)
    yield local
    if storage.is_uri(out):
        storage.upload(local, out)


def eval_step(cfg, run: str | None = None, checkpoint: str | None = None, heldout: dict | None = None,
              trust_remote_code: bool | None = None, say=None) -> dict:
    """Evaluate a trained run against its base, apply the regression gate, write the report:
    ``RUN/eval/results.json`` and ``RUN/report/``. ``run`` defaults to the config's run directory
    (unless ``checkpoint`` is given); behind a URI the model, metrics and config are downloaded
    first and eval/ and report/ uploaded after. Returns the results (``["gate"]["passed"]``)."""
    from llamapro.report import evaluate_and_report

    target = run or (None if checkpoint else cfg.run.run_dir())
    kw = dict(checkpoint=checkpoint, heldout=heldout, trust_remote_code=trust_remote_code, say=say)
    if target is None or not storage.is_uri(target):
        return evaluate_and_report(cfg, run_dir=run, **kw)
    with storage.synced(target, pull=EVAL_PULL, push=EVAL_PUSH) as local:
        return evaluate_and_report(cfg, run_dir=str(local), **kw)


def export_step(cfg, source: str | None = None, out: str | None = None, force: bool = False,
                fmt: str = "hf", quant: str | None = None, trust_remote_code: bool | None = None,
                say=None) -> dict:
    """Export a run (``RUN/model``) or checkpoint as a clean standard HF directory with a model
    card (``fmt`` hf), or as GGUF / a quantized directory. ``source`` defaults to the config's run
    directory, ``out`` to ``export.out``, else ``RUN/export``; either may be a URI (worked on
    locally, then uploaded). Written atomically; an existing OUT is replaced only with ``force``
    (or ``export.force``). Returns the export metadata."""
    from llamapro.publish.export import export, export_format

    xc = cfg.export
    source = str(source or cfg.run.run_dir())
    trc = cfg.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    with _working_copy(source, out or xc.out or None, "export", EXPORT_PULL, []) as (run, dest):
        if fmt != "hf":
            return export_format(fmt, str(run), str(dest), quant=quant, force=force,
                                 trust_remote_code=trc, say=say)
        return export(run, dest, force=force or xc.force, max_shard_size=xc.max_shard_size,
                      dtype=xc.dtype, trust_remote_code=trc, base_model=xc.base_model or None,
                      license=xc.license or None, say=say)


def fuse_step(cfg, source: str | None = None, out: str | None = None, heldout: dict | None = None,
              force: bool = False, alpha_given: bool = False, trust_remote_code: bool | None = None,
              say=None) -> dict:
    """Fuse a trained run into one standard HF model (``fuse.method``, ``fuse.alpha``; auto
    searches ``fuse.alphas`` against the regression gate). ``source`` defaults to the config's run
    directory, ``out`` to ``fuse.out``, else ``RUN/fused``; the alpha curve goes to
    ``RUN/fusion/`` and ``RUN/report/``. URIs are worked on locally and uploaded. Raises
    NoAlphaPassesGate (exit 4) when no alpha passes."""
    from llamapro.publish.fuse import run_fuse

    source = str(source or cfg.run.run_dir())
    out = out or cfg.fuse.out or None
    kw = dict(heldout=heldout, force=force, alpha_given=alpha_given, trust_remote_code=trust_remote_code,
              say=say)
    if not storage.is_uri(source) and not storage.is_uri(out):  # in place: run_fuse picks OUT
        return run_fuse(cfg, source, out, **kw)
    with _working_copy(source, out, "fused", FUSE_PULL, FUSE_PUSH) as (run, dest):
        return run_fuse(cfg, run, dest, **kw)


def pack_step(source: str, out: str, force: bool = False, name: str | None = None,
              trust_remote_code: bool = False) -> dict:
    """The inserted blocks of a trained (or expanded) run as a pack for its base (``llamapro
    pack``); ``source`` and ``out`` may be URIs (worked on locally, then uploaded)."""
    from llamapro.publish.pack import make_pack

    with _working_copy(str(source), out, "pack", PACK_PULL, []) as (run, dest):
        return make_pack(run, dest, force=force, name=name, trust_remote_code=trust_remote_code)


# Overrides that turn any config into a ~3-minute smoke run of every step (tests use it). Two
# stages of 2 steps each, so staging runs too, at the staged layout's best LR in the study (3e-4):
# the one-stage default of 1e-3 overshoots in a 2-step stage (the domain loss rose 0.011 nats on
# SmolLM2 on 2026-12-03, where 3e-4 had always lowered it).
QUICK = ["train.max_tokens=0", "train.max_steps=4", "train.num_stages=2", "train.lr=3e-4", "train.eval_every=2",
         "train.checkpoint_every=2", "train.eval_batches=1", "train.micro_batch_size=2",
         "data.seq_len=128", "eval.max_blocks=4", "eval.max_prompts=3", "eval.max_new_tokens=8",
         "eval.battery.limit=20"]


def _say(msg: str) -> None:
    print(msg, flush=True)


def ensure_demo_corpora(cfg) -> None:
    """Build the demo corpora on first use when the config names them (demo:NAME paths)."""
    from llamapro.config import default_cache_dir

    names = sorted({p.split(":", 1)[1] for s in cfg.data.sources for p in s.paths if p.startswith("demo:")})
    missing = [n for n in names if not (default_cache_dir() / "corpora" / n).is_dir()]
    if missing:
        from llamapro.data.corpora import build_corpora

        _say(f"      building demo corpora {missing} (once)")
        build_corpora(names=missing, say=lambda m: None)


def serve_section(cfg) -> dict:
    """The config's serve section as a plain dict (a typed section or a mapping)."""
    import dataclasses

    s = cfg.serve
    return dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s or {})


def serve_smoke(cfg, export_dir: Path, base_dir: str) -> dict:
    """Deploy base + exported model behind the OpenAI API, ask one chat question, shut down."""
    import socket

    from ray import serve

    from llamapro.serve import chat_once, deploy, serve_config_from_dict

    sink = runtime.active_log_file()
    if sink is not None:  # Serve's own logger (configured when ray.serve is imported) into the file
        sink.refresh_loggers()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sc = serve_section(cfg)
    sc.update(host="127.0.0.1", port=port)
    sc["models"] = {"base": {"path": base_dir, "num_cpus": 1},
                    "expanded": {"path": str(export_dir), "num_cpus": 1}}
    sc["canary"] = {"weights": {"base": 0.0, "expanded": 1.0}}
    scfg = serve_config_from_dict(sc)
    try:
        deploy(scfg, wait_s=600)
        return chat_once(f"http://127.0.0.1:{port}/v1", "expanded")
    finally:
        serve.shutdown()


def pack_beside_export(run: Path, out: Path, name: str) -> dict:
    """The run's new blocks as a pack (`llamapro apply BASE pack`); a run whose originals changed
    (trained norms, ...) has no pack: the export is then the only artifact, and the summary says
    why."""
    from llamapro.publish.pack import PackError, make_pack

    try:
        res = make_pack(str(run), str(out), force=True, name=name)
    except PackError as e:
        log.warning("no pack beside the export: %s", e)
        return {"out": None, "why_not": str(e)}
    _say(f"      pack -> {out} ({res['blocks']['bytes'] / 1e6:.1f} MB)")
    return {"out": str(out), "bytes": res["blocks"]["bytes"], "positions": res["positions"]}


def run_pipeline(cfg, quick: bool = False) -> dict:
    """expand -> verify -> train -> evaluate (gate) -> report -> export -> serve smoke."""
    if cfg.serve:  # fail before any work on a bad serve section
        from llamapro.serve import serve_config_from_dict

        serve_config_from_dict(serve_section(cfg))
    # expand and train upload their own outputs; the rest goes up when the run succeeds
    outputs = ["eval", "report", "export", "pack", "summary.json"]
    outputs += [f"baseline-{m}/{d}" for m in cfg.run.baselines for d in ("eval", "report")]
    outputs += ["fused", "fusion"] if cfg.fuse.enabled and not cfg.fuse.out else []
    with storage.synced(cfg.run.run_dir(), push=outputs) as rd:
        return _run_pipeline(cfg, rd, quick)


def _run_pipeline(cfg, rd: Path, quick: bool) -> dict:
    import json
    import time

    from llamapro.publish.export import export

    t0 = time.perf_counter()
    summary: dict = {"run_dir": cfg.run.run_dir()}
    _say(f"[1/7] base model {cfg.model.base}")
    base_dir = base_model_dir(cfg)
    _say(f"[2/7] expand {cfg.expand.blocks} blocks ({cfg.expand.strategy}) and prove identity")
    meta = expand_step(cfg, progress=not quick)
    v = meta.get("verification") or {}
    summary["identity"] = {"max_abs_logit_diff": v.get("max_abs_logit_diff"),
                           "generation_equal": v.get("greedy_generation_equal")}
    _say(f"      new layers {meta['new_layer_indices']}; max |dlogits| = {v.get('max_abs_logit_diff')}")
    _say("[3/7] data: demo corpora" if any(p.startswith("demo:") for s in cfg.data.sources for p in s.paths)
         else "[3/7] data")
    ensure_demo_corpora(cfg)
    ensure_ray(cfg)
    _say(f"[4/7] train ({cfg.train.num_stages} stage(s), ZeRO-{cfg.train.zero_stage}, "
         f"{cfg.train.num_workers} workers)")
    tr = train_step(cfg)
    summary["train"] = tr["out"]
    runs = {"llamapro": Path(tr["out"])}
    for mode in cfg.run.baselines:
        _say(f"      baseline {mode} at the same token budget")
        runs[mode] = Path(train_step(cfg, mode=mode)["out"])
    _say("[5/7] evaluate (held-out loss, greedy agreement, regression gate) and report")
    results = {}
    for name, d in runs.items():
        results[name] = eval_step(cfg, run=str(d))
    summary["eval"] = {n: {k: res.get(k) for k in ("sets", "gate")} for n, res in results.items()}
    _say(f"[6/7] export -> {rd / 'export'}")
    xc = cfg.export  # the card's base_model / licence and the dtype, as `llamapro export --config`
    export(str(runs["llamapro"]), str(rd / "export"), force=True, max_shard_size=xc.max_shard_size,
           dtype=xc.dtype, trust_remote_code=cfg.model.trust_remote_code,
           base_model=xc.base_model or None, license=xc.license or None)
    summary["export"] = str(rd / "export")
    summary["pack"] = pack_beside_export(runs["llamapro"], rd / "pack", cfg.run.name)
    if cfg.fuse.enabled:  # optional: the alpha curve into the report, a fused model beside the export
        from llamapro.publish.fuse import run_fuse

        _say(f"      fuse ({cfg.fuse.method}, alpha {cfg.fuse.alpha}) -> {rd / 'fused'}")
        fz = run_fuse(cfg, str(runs["llamapro"]), cfg.fuse.out or str(rd / "fused"), force=True)
        summary["fuse"] = {"out": fz["out"], "method": fz["fusion"]["method"], "alpha": fz["fusion"]["alpha"]}
    _say("[7/7] serve: one chat request through the OpenAI API")
    summary["serve"] = serve_smoke(cfg, rd / "export", base_dir)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["report"] = str(runs["llamapro"] / "report" / "report.html")
    (rd / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
