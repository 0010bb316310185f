"""The Ray Data pipeline: plan the shards, units and mixture rates of a config on the driver, then
stream packed blocks from a pool of tokenizer actors (``build_train_dataset``,
``build_eval_dataset``); a stats actor enforces the skip budget per source."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from llamapro.config import ConfigError, DataConfig, SourceConfig
from llamapro.data.blocks import process_unit
from llamapro.data.counts import check_source, merge_counts, new_counts
from llamapro.data.mixture import estimate_tokens, mixture_rates
from llamapro.data.sources import FileRef, resolve_paths
from llamapro.data.tokens import Encoder, load_tokenizer
from llamapro.data.units import Unit, interleave, plan_units
from llamapro.errors import DataError

log = logging.getLogger(__name__)

_BLOCK_BYTES = 8 << 20    # Ray Data block size cap: the stream's memory must not grow with a unit


class _Stats:
    """Collects per-unit counts (a Ray actor). Keyed by unit and pass, so a re-run epoch or a
    retried task replaces its counts instead of adding to them."""

    def __init__(self, files_per_source: dict[int, int], units_per_source: dict[int, int]):
        self.files = files_per_source
        self.units = units_per_source
        self.by_unit: dict[tuple, dict] = {}

    def report(self, source: int, uid: str, pass_index: int, counts: dict):
        self.by_unit[(source, uid, pass_index)] = counts
        return self.totals(source)

    def totals(self, source: int):
        """(reading counts of pass 0, blocks emitted by all passes, every unit read?)."""
        first = [c for (s, _, p), c in self.by_unit.items() if s == source and p == 0]
        total = merge_counts(first)
        total["blocks_emitted"] = sum(c["blocks_emitted"] for (s, _, _), c in self.by_unit.items()
                                      if s == source)
        return total, len(first) >= self.units.get(source, 0)

    def snapshot(self):
        return {s: self.totals(s)[0] for s in self.units}


class _UnitProcessor:
    """The Ray Data actor: owns a tokenizer, turns one work unit per call into packed blocks."""

    def __init__(self, tokenizer, sources: list[SourceConfig], units: dict[str, Unit], *,
                 seq_len: int, split: str, seed: int, rates: dict[str, float], max_doc_bytes: int,
                 max_skip_fraction: float, stats, enforce: bool):
        self.encoder = Encoder(tokenizer)
        self.sources, self.units = sources, units
        self.seq_len, self.split, self.seed, self.rates = seq_len, split, seed, rates
        self.max_doc_bytes, self.max_skip = max_doc_bytes, max_skip_fraction
        self.stats, self.enforce = stats, enforce
        self.files_per_source: dict[int, int] = {}
        for u in units.values():
            self.files_per_source[u.source] = self.files_per_source.get(u.source, 0) + len(u.files)

    def __call__(self, batch: dict) -> Iterator[dict]:
        import ray

        for uid, p in zip(batch["unit"], batch["pass"]):
            unit = self.units[str(uid)]
            src = self.sources[unit.source]
            counts = new_counts()
            for ids, labels in process_unit(
                    unit, src, self.encoder, seq_len=self.seq_len, split=self.split,
                    seed=self.seed, rate=self.rates.get(src.name, 1.0), pass_index=int(p),
                    max_doc_bytes=self.max_doc_bytes, counts=counts):
                yield {"input_ids": ids, "labels": labels,
                       "source": np.full(len(ids), unit.source, dtype=np.int32)}
            totals, complete = ray.get(self.stats.report.remote(unit.source, unit.uid, int(p),
                                                                counts))
            if self.enforce and complete:
                problem = check_source(src.name, totals,
                                       files_total=self.files_per_source[unit.source],
                                       max_skip_fraction=self.max_skip, seq_len=self.seq_len,
                                       split=self.split)
                if problem:
                    raise DataError(problem)


@dataclass
class Plan:
    """What a dataset will read: resolved shards, units, rates and the stats actor."""

    cfg: DataConfig
    split: str
    source_indices: list[int]
    files: dict[int, list[FileRef]] = field(default_factory=dict)
    units: dict[int, list[Unit]] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    stats: Any = None


def build_dataset(cfg: DataConfig, tokenizer_path, split: str, names: list[str] | None,
                  enforce: bool, max_files: int | None = None):
    """(dataset, plan, tokenizer bundle) of ``split`` ("train": every weighted source plus
    ``names``; "eval": the sources ``names``). ``enforce`` raises DataError on a source that
    breaks the skip budget; ``max_files`` reads at most that many shards per source."""
    import ray

    if not cfg.sources:
        raise ConfigError("data.sources is empty: configure at least one source")
    if split == "train":
        indices = [i for i, s in enumerate(cfg.sources)
                   if s.weight > 0 or (names is not None and s.name in names)]
    else:
        indices = [cfg.source_names().index(n) for n in names]
    plan = Plan(cfg, split, indices)
    tok = load_tokenizer(tokenizer_path)
    for i in indices:
        src = cfg.sources[i]
        files = resolve_paths(src.paths, src.format, f"data.sources[{i}] ({src.name})")
        if max_files:
            files = files[:max_files]
        plan.files[i] = files
        plan.units[i] = plan_units(i, src, files, cfg.seed, cfg.actors)

    weights = {cfg.sources[i].name: cfg.sources[i].weight for i in indices}
    if split == "train" and sum(1 for w in weights.values() if w > 0) > 1:
        enc = Encoder(tok)
        for i in indices:
            src = cfg.sources[i]
            if src.weight > 0:
                plan.estimates[src.name] = estimate_tokens(
                    src, plan.units[i], enc, seed=cfg.seed, max_doc_bytes=cfg.max_doc_bytes)
        plan.rates = mixture_rates(plan.estimates, weights, cfg.mixing)
    else:
        plan.rates = {n: (1.0 if (w > 0 or split == "eval") else 0.0) for n, w in weights.items()}
    for i in indices:
        name = cfg.sources[i].name
        passes = max(1, math.ceil(plan.rates[name] - 1e-9))
        for u in plan.units[i]:
            u.passes = passes
        log.info("data %s source %s: %d files in %d units, estimated %.0f tokens, rate %.3f",
                 split, name, len(plan.files[i]), len(plan.units[i]),
                 plan.estimates.get(name, float("nan")), plan.rates[name])

    work = interleave([plan.units[i] for i in indices])
    by_uid = {u.uid: u for i in indices for u in plan.units[i]}
    # Pinned (hard) to the node of the process building the dataset, which lives as long as the
    # job does: a 0-CPU actor may otherwise land on any node, and losing that node would kill it
    # (it holds state, so it is not restarted) and with it every later unit, in every restarted
    # worker group. A soft pin was seen to spill over to a worker node while the head was busy
    # starting processes.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    stats_cls = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False))(_Stats)
    plan.stats = stats_cls.remote({i: len(plan.files[i]) for i in indices},
                                  {i: len(plan.units[i]) for i in indices})
    rows = [u.row(p) for u, p in work]
    pool = min(cfg.actors, max(1, len(rows)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(
        _UnitProcessor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool, initial_size=pool),
        num_cpus=cfg.cpus_per_actor,
        **({"resources": dict(cfg.actor_resources)} if cfg.actor_resources else {}),
        fn_constructor_kwargs=dict(
            tokenizer=tok, sources=cfg.sources, units=by_uid, seq_len=cfg.seq_len, split=split,
            seed=cfg.seed, rates=plan.rates, max_doc_bytes=cfg.max_doc_bytes,
            max_skip_fraction=cfg.max_skip_fraction, stats=plan.stats, enforce=enforce),
    )
    # This dataset's own context (from_items copied the global one): by default an actor buffers
    # up to 128 MB of output per call before emitting a block, so memory would grow with the
    # size of a work unit; small blocks keep it flat and get the first blocks out early.
    ds.context.target_max_block_size = _BLOCK_BYTES
    if cfg.preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds, plan, tok


def build_train_dataset(cfg: DataConfig, tokenizer_path) -> "ray.data.Dataset":  # noqa: F821
    """The training stream: rows ``input_ids`` and ``labels`` (int64, length ``cfg.seq_len``;
    labels -100 where no loss is taken) and ``source`` (int32 index into ``cfg.sources``).

    Lazy: nothing is read until a consumer iterates; each epoch re-runs the pipeline and yields
    the same set of blocks. Raises DataPathError now for a path that matches nothing, and
    DataError during iteration when a source yields nothing or breaks the skip budget.
    ``tokenizer_path`` is a model directory/hub id, or an already loaded fast tokenizer.
    """
    ds, _, _ = build_dataset(cfg, tokenizer_path, "train", None, enforce=True)
    return ds


def build_eval_dataset(cfg: DataConfig, tokenizer_path,
                       source_name: str) -> "ray.data.Dataset":  # noqa: F821
    """Held-out blocks of one source (same columns as training; the last block of each work unit
    is padded with labels -100, so every held-out token is scored exactly once)."""
    src = cfg.source(source_name)
    if src.eval_fraction <= 0:
        raise ConfigError(f"data source {source_name!r} has eval_fraction 0: it holds nothing out")
    ds, _, _ = build_dataset(cfg, tokenizer_path, "eval", [source_name], enforce=True)
    return ds
