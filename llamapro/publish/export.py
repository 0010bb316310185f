"""``llamapro export RUN_OR_CHECKPOINT OUT``: a clean standard Hugging Face directory, or another
format (``--format gguf|torchao-int8|torchao-int4|gptq|awq``).

safetensors shards (``max_shard_size``), config with the right layer count, tokenizer, chat
template and generation config, ``llamapro.json`` (lineage plus what the export did) and a model
card ``README.md`` (:mod:`llamapro.publish.card`): base fingerprint, inserted positions, strategy,
data mixture, stages, metrics and the regression gate's verdict. PEFT/LoRA adapters found with the
checkpoint are merged (:mod:`llamapro.publish.source`), so the result loads in plain
``transformers`` without llamapro or peft.

The export is written to a temporary sibling of OUT and renamed into place
(:func:`llamapro.publish.standard_dir.write_standard_dir`): an interrupted export leaves the
previous OUT intact, and an existing OUT is only replaced with ``force``. With the originals
frozen and the dtype kept, ``llamapro strip OUT BASE_AGAIN`` on the export gives back the base bit
for bit.
"""

from __future__ import annotations

from pathlib import Path

from llamapro.artifacts import read_metadata, read_results
from llamapro.errors import CheckpointError
from llamapro.publish.gguf import export_gguf
from llamapro.publish.quant import export_gptq, export_torchao
from llamapro.publish.source import check_destination, load_merged
from llamapro.publish.standard_dir import write_standard_dir

FORMATS = ("hf", "gguf", "torchao-int8", "torchao-int4", "gptq", "awq")


def export(src, out, force: bool = False, max_shard_size: str = "2GB", dtype: str = "auto",
           trust_remote_code: bool = False, base_model: str | None = None, license: str | None = None,
           say=None) -> dict:
    """Export a run (RUN/model) or checkpoint to ``out``; returns the export metadata."""
    say = say or (lambda m: None)
    run, ckpt, out = check_destination(src, out, force)
    meta = read_metadata(ckpt) or {}
    results = read_results(run) if run is not None else None
    say(f"loading {ckpt}")
    model, info = load_merged(ckpt, dtype, trust_remote_code, say)
    return write_standard_dir(model, out, ckpt, run, meta, info, results, force=force,
                              max_shard_size=max_shard_size, dtype=dtype, base_model=base_model,
                              license=license, say=say)


def export_format(fmt: str, src, out, quant: str | None = None, force: bool = False,
                  trust_remote_code: bool = False, say=None) -> dict:
    """Export in a portable or quantized format (``hf`` is :func:`export`). Each writer checks
    the whole request before writing and publishes OUT atomically; the result has ``path`` (the
    file or directory to load) and ``bytes`` (its size on disk)."""
    if fmt == "gguf":
        return export_gguf(src, out, quant=quant or "f16", force=force,
                           trust_remote_code=trust_remote_code, say=say)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quant:
        raise CheckpointError(f"--quant applies to --format gguf only (got --format {fmt} --quant {quant})")
    if fmt.startswith("torchao-"):
        return export_torchao(src, out, scheme=fmt.split("-", 1)[1], force=force,
                              trust_remote_code=trust_remote_code, say=say)
    if fmt in ("gptq", "awq"):
        return export_gptq(src, out, method=fmt, force=force, trust_remote_code=trust_remote_code, say=say)
    res = export(src, out, force=force, trust_remote_code=trust_remote_code, say=say)
    return {**res, "path": res["out"], "bytes": sum(p.stat().st_size for p in Path(out).iterdir())}
