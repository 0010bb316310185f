"""One typed config tree for every step, loaded strictly from YAML with dotted overrides.

Unknown keys are errors that name the key and its section (a misspelled key silently ignored is a
run wasted). Each field documents why it exists. Derived values are methods. No torch, no ray.

    cfg = load_config("jobs/configs/demo.yaml", ["expand.blocks=4", "data.seq_len=512"])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


from llamapro.errors import ConfigError  # noqa: E402,F401  (re-exported: llamapro.config.ConfigError)


def default_cache_dir() -> Path:
    """Where llamapro caches the converted demo model and demo corpora.

    ``$LLAMAPRO_CACHE`` if set, else ``$XDG_CACHE_HOME/llamapro``, else ``~/.cache/llamapro``.
    """
    if os.environ.get("LLAMAPRO_CACHE"):
        return Path(os.environ["LLAMAPRO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamapro"


# --- sections -------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    base: str = "demo:smollm2-135m-instruct"
    """The base model: an HF directory, a hub id (when the hub is reachable), or
    ``demo:smollm2-135m-instruct`` (the bundled demo model, converted once from GGUF and cached)."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its author."""
    dtype: str = "auto"
    """Weights dtype for loading: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")


STRATEGIES = ("even", "top", "bottom", "middle")
"""Where new blocks can go (built by ``llamapro.expansion.strategies``, validated here)."""


@dataclass
class ExpandConfig:
    blocks: int = 6
    """How many new blocks to insert. Any N >= 1 works with every strategy."""
    strategy: str = "even"
    """even (LLaMA-Pro interleaving), top, bottom or middle. Ignored when positions is set."""
    positions: list[int] = field(default_factory=list)
    """Explicit indices of the new blocks in the expanded model (overrides strategy)."""
    residual_writers: list[str] = field(default_factory=list)
    """For a model family llamapro does not know: module paths inside a layer that write into the
    residual stream (e.g. self_attn.o_proj, mlp.down_proj). Checked numerically."""
    verify: bool = True
    """Prove identity (logits + greedy generation vs the base) right after expanding."""

    def __post_init__(self):
        if not self.positions and self.strategy not in STRATEGIES:
            raise ConfigError(
                f"expand.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}"
            )
        if not self.positions and (not isinstance(self.blocks, int) or self.blocks < 1):
            raise ConfigError(f"expand.blocks={self.blocks!r}: must be an integer >= 1")


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name: the directory under output_dir and the Ray Train run name."""
    output_dir: str = "runs"
    """Where every artifact of a run goes (local path or a cloud URI)."""
    seed: int = 0
    baselines: list[str] = field(default_factory=list)
    """`llamapro run` also trains these baselines at the same token budget and evaluates them
    beside LLaMA-Pro: any of full, lora, freeze_last_n (the comparison of methods, measured)."""
    baseline_lrs: dict[str, float] = field(default_factory=dict)
    """Each baseline's own learning rate (``{full: 1.0e-4, lora: 3.0e-3}``); a baseline not named
    trains at ``train.lr``. A method judged at an LR chosen for another is not judged fairly: the
    study (``benchmarks/study.py``) finds each method's best LR at your budget."""

    def __post_init__(self):
        bad = [b for b in self.baselines if b not in ("full", "lora", "freeze_last_n")]
        if bad:
            raise ConfigError(f"run.baselines: {bad} unknown; use full, lora or freeze_last_n")
        if not isinstance(self.baseline_lrs, dict):
            raise ConfigError("run.baseline_lrs: expected a mapping such as {full: 1.0e-4, lora: 3.0e-3}")
        for k, v in self.baseline_lrs.items():
            if k not in ("full", "lora", "freeze_last_n"):
                raise ConfigError(f"run.baseline_lrs: {k!r} is not a baseline; use full, lora or freeze_last_n")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"run.baseline_lrs.{k}: {v!r} is not a learning rate (a number in (0, 1))")

    def run_dir(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{self.name}"


@dataclass
class SourceConfig:
    """One corpus in the training mixture (and its held-out evaluation split)."""

    name: str = ""
    """Identifier of the source: names it in previews, in the mixture report and in
    ``build_eval_dataset(cfg, tok, name)``; the ``source`` column of a block is its index in
    ``data.sources``. Required, unique; letters, digits, ``_``, ``-`` and ``.`` only."""
    paths: list[str] = field(default_factory=list)
    """Where the shards are: files, directories (read recursively; only files with a data
    extension for ``format`` are taken, hidden and ``_``-prefixed ones are ignored), globs
    (``data/*.jsonl.gz``, ``**`` recurses), any URI pyarrow understands (``s3://``, ``gs://``,
    ``hdfs://``, ``file://``), or ``demo:NAME`` for a corpus built by ``llamapro data corpora``.
    A path that matches nothing is an error that names it."""
    format: str = "auto"
    """auto (by extension: .jsonl/.json/.ndjson, .parquet/.pq, .txt/.text, each optionally
    .gz/.bz2/.zst/.lz4 compressed), jsonl, parquet or text. Set it when extensions lie."""
    kind: str = "text"
    """text: raw text for continued pretraining (loss on every token). instruct: conversations
    (``messages`` lists of role/content, ShareGPT ``conversations``, or alpaca
    instruction/input/output records) rendered with the model's chat template, loss only on the
    assistant's replies."""
    text_field: str = "text"
    """The field (jsonl key or parquet column) holding a document's text when kind is text."""
    messages_field: str = "messages"
    """The field holding the conversation when kind is instruct; records without it are read as
    alpaca (instruction/input/output) when those fields are present."""
    text_unit: str = "file"
    """What one document is in a plain-text file: file (the whole file), paragraph (blocks
    separated by blank lines) or line. It is also the unit of the held-out split."""
    weight: float = 1.0
    """Share of this source's tokens in the training stream, relative to the other sources'
    weights (0.7 and 0.3 mean 70%/30%). 0 keeps a source out of training while its held-out split
    stays available for evaluation."""
    eval_fraction: float = 0.01
    """Fraction of this source's documents held out for evaluation, chosen by a hash of each
    document's content and data.seed, so the same documents are held out on every run and a
    held-out document never reaches a training block (duplicates land on the same side)."""


_SOURCE_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass
class DataConfig:
    """The Ray Data pipeline that streams packed token blocks to the Train workers."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The corpora to mix: each a SourceConfig (name, paths, weight, ...)."""
    seq_len: int = 1024
    """Tokens in one packed block: the training sequence length. Documents are concatenated,
    separated by EOS, and cut into blocks of exactly this length."""
    seed: int = 0
    """Seeds the held-out split, the shard order and the mixture sampling: the same seed and
    corpus give the same blocks. Kept apart from run.seed so that changing the training seed
    never moves documents between the training and held-out splits."""
    mixing: str = "downsample"
    """How weights are met when the corpora's sizes disagree with them. downsample: the source
    scarcest relative to its weight is used once in full and the others are thinned (no block is
    repeated). upsample: every block of the most plentiful source is used once and the others are
    repeated as needed."""
    max_skip_fraction: float = 0.05
    """Budget for bad input per source: the run fails, naming the source and the reasons, when
    more than this share of its documents (or of its files) had to be skipped. Bad records below
    the budget are skipped and counted, never fatal."""
    max_doc_bytes: int = 16 * 1024 * 1024
    """A single document (jsonl line, text unit, record) larger than this is skipped as
    too_large, so one runaway record cannot exhaust a worker's memory."""
    actors: int = 2
    """Most tokenizer actors Ray Data runs (each reads, tokenizes and packs whole shards).
    Leave CPUs for them next to the Train workers or the pipeline starves."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each tokenizer actor reserves."""
    actor_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each tokenizer actor also reserves, e.g. ``{data: 1}`` to keep the
    actors on the nodes started with ``ray start --resources '{"data": 8}'``. Use it to keep them
    off preemptible nodes: Ray Data cannot restart an actor lost with its node (its constructor
    arguments are gone, ray-project/ray#53713), so losing one fails the stream, and the training
    run survives that only by restarting its worker group."""
    preserve_order: bool = False
    """Deliver blocks in a deterministic order (Ray Data preserve_order). The set of blocks is
    deterministic either way; ordering costs some throughput."""

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ConfigError(f"data.seq_len={self.seq_len!r}: must be an integer >= 8")
        if self.mixing not in ("downsample", "upsample"):
            raise ConfigError(f"data.mixing={self.mixing!r}: use downsample or upsample")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(
                f"data.max_skip_fraction={self.max_skip_fraction!r}: must be between 0 and 1")
        if self.max_doc_bytes < 1:
            raise ConfigError(f"data.max_doc_bytes={self.max_doc_bytes!r}: must be >= 1")
        if self.actors < 1:
            raise ConfigError(f"data.actors={self.actors!r}: must be >= 1")
        if not self.cpus_per_actor > 0:
            raise ConfigError(f"data.cpus_per_actor={self.cpus_per_actor!r}: must be > 0")
        for k, v in self.actor_resources.items():
            if k in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(f"data.actor_resources.{k}: a built-in resource; set CPUs with "
                                  "data.cpus_per_actor (GPUs and memory are not used by tokenizers)")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"data.actor_resources.{k}={v!r}: must be a number > 0")
        seen: set[str] = set()
        for i, src in enumerate(self.sources):
            where = f"data.sources[{i}]"
            if not isinstance(src, SourceConfig):
                raise ConfigError(f"{where}: expected a source mapping, got {src!r}")
            if not src.name or not set(src.name) <= _SOURCE_NAME_OK:
                raise ConfigError(
                    f"{where}.name={src.name!r}: required; letters, digits, _ - . only")
            if src.name in seen:
                raise ConfigError(f"{where}.name={src.name!r}: used by another source")
            seen.add(src.name)
            if not src.paths:
                raise ConfigError(f"{where}.paths: give at least one file, directory, glob or URI")
            if src.format not in ("auto", "jsonl", "parquet", "text"):
                raise ConfigError(
                    f"{where}.format={src.format!r}: use auto, jsonl, parquet or text")
            if src.kind not in ("text", "instruct"):
                raise ConfigError(f"{where}.kind={src.kind!r}: use text or instruct")
            if src.text_unit not in ("file", "paragraph", "line"):
                raise ConfigError(
                    f"{where}.text_unit={src.text_unit!r}: use file, paragraph or line")
            if not src.text_field or not src.messages_field:
                raise ConfigError(f"{where}: text_field and messages_field must not be empty")
            if not src.weight >= 0:
                raise ConfigError(f"{where}.weight={src.weight!r}: must be >= 0")
            if not 0.0 <= src.eval_fraction <= 1.0:
                raise ConfigError(
                    f"{where}.eval_fraction={src.eval_fraction!r}: must be between 0 and 1")
            if src.eval_fraction >= 1.0 and src.weight > 0:
                raise ConfigError(
                    f"{where}: eval_fraction=1 leaves nothing to train on; set weight: 0 to make "
                    "it an evaluation-only source")
        if self.sources and not any(s.weight > 0 for s in self.sources):
            raise ConfigError("data.sources: every weight is 0; at least one source must train")

    def source_names(self) -> list[str]:
        """Names by index: the ``source`` column of a block indexes this list."""
        return [s.name for s in self.sources]

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        names = ", ".join(self.source_names()) or "none"
        raise ConfigError(f"no data source named {name!r}; configured: {names}")


@dataclass
class Config:
    """The whole pipeline. Each step reads its section; unknown sections are errors."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    expand: ExpandConfig = field(default_factory=ExpandConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: "TrainConfig" = field(default_factory=lambda: TrainConfig())
    eval: "EvalConfig" = field(default_factory=lambda: EvalConfig())
    export: "ExportConfig" = field(default_factory=lambda: ExportConfig())
    tune: "TuneConfig" = field(default_factory=lambda: TuneConfig())
    """`llamapro tune`: the search space, objective and scheduler (llamapro/config/tune.py)."""
    fuse: "FuseConfig" = field(default_factory=lambda: FuseConfig())
    serve: "ServeConfig" = field(default_factory=lambda: ServeConfig())
    """`llamapro serve` and the pipeline's serve smoke test: models, autoscaling, canary, limits
    (llamapro/config/serve.py)."""

    def __post_init__(self):
        # tune.space names keys of this tree: checked here, where the whole tree is known
        check_space(self.tune.space, Config)


# The step sections live beside their steps (pure modules, no torch/ray); they import ConfigError
# from here, so they are imported after it exists.
from llamapro.config.loader import (  # noqa: E402,F401  (re-exported)
    _coerce,
    _field_types,
    apply_overrides,
    from_dict,
    read_config_data,
    to_dict,
)
from llamapro.config.eval import EvalConfig, ExportConfig, FuseConfig  # noqa: E402
from llamapro.config.serve import ServeConfig  # noqa: E402
from llamapro.config.train import TrainConfig  # noqa: E402
from llamapro.config.tune import TuneConfig, check_space  # noqa: E402


# --- loading --------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None = None, overrides=None, cls=Config):
    """Load ``path`` (YAML) strictly, apply dotted overrides, validate, return the typed tree."""
    return from_dict(cls, read_config_data(path, overrides))
