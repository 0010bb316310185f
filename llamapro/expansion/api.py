"""The expansion steps as functions: what `llamapro expand / verify / strip` and `jobs/` call.

expand = plan placement -> stream tensors to disk (``streaming``) -> check the new config builds
exactly the tensors written (``structure``) -> read back the zeroed writers -> prove identity
numerically (``proof``: logits and greedy generation with a KV cache against the base). Every
number lands in the checkpoint's ``llamapro.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from llamapro.artifacts import write_metadata
from llamapro.errors import CheckpointError, IdentityError, UnprovenError  # noqa: F401
from llamapro.expansion.families import expand_config, family_for, num_layers_of
from llamapro.expansion.proof import DEFAULT_PROMPTS, require_proven, verify_checkpoint  # noqa: F401
from llamapro.expansion.resolve import resolve_local  # noqa: F401
from llamapro.expansion.strategies import plan
from llamapro.expansion.streaming import stream_expand, stream_strip
from llamapro.expansion.structure import check_structure_isolated
from llamapro.tensors import read_config, tensor_table

log = logging.getLogger(__name__)

def expand(base: str, out: str, blocks: int | None = None, strategy: str | None = "even",
           positions=None, residual_writers=None, verify: bool = True, force: bool = False,
           trust_remote_code: bool = False, progress: bool = True, verify_max_gb: float = 16.0,
           durable: bool = True) -> dict:
    """Expand ``base`` into ``out`` and prove it. Returns the metadata. ``durable=False`` skips the
    fsync before publishing (see ``tensors.atomic_dir``)."""
    t0 = time.perf_counter()
    base_dir = resolve_local(base)
    config = read_config(base_dir)
    family = family_for(config.get("model_type", "?"), residual_writers or None)
    placement = plan(num_layers_of(config), blocks, strategy, positions)
    new_config, _ = expand_config(config, placement)
    sources = {str(k): v for k, v in placement.new_sources().items()}

    # The structure check imports transformers (CPU-bound, seconds) while the copy waits on I/O:
    # run it beside the copy (in a child process, see check_structure_isolated), and let
    # stream_expand refuse to publish if it failed.
    def structure():
        return check_structure_isolated(config, new_config, sources, trust_remote_code)

    def prove(tmp: Path, meta: dict) -> dict:
        # On the unpublished output: a failed proof raises here, and atomic_dir then leaves a
        # previous OUT (a good one replaced with --force) exactly as it was.
        meta["expand_seconds"] = round(time.perf_counter() - t0, 3)
        size_gb = sum(t.nbytes for t in tensor_table(tmp).values()) / 1e9
        if verify and size_gb <= verify_max_gb:
            write_metadata(tmp, meta)
            meta = verify_checkpoint(str(tmp), base=str(base_dir), trust_remote_code=trust_remote_code,
                                     progress=progress)
        else:
            reason = ("--no-verify" if not verify else
                      f"{size_gb:.1f} GB exceeds verify_max_gb={verify_max_gb:g} (the proof loads the "
                      "model and its base in float32)")
            log.warning("%s is published UNPROVEN: %s. Only the structure and zero-byte checks ran. "
                        "Run `llamapro verify %s` on a machine that can hold the model; training "
                        "refuses it until then unless you pass --allow-unproven", out, reason, out)
            meta["verification"] = {"ok": False, "status": "unproven", "reason": reason,
                                    "how_to_prove": f"llamapro verify {out}",
                                    "checks_passed": ["structure", "new blocks' writers zero"]}
            write_metadata(tmp, meta)
        return meta

    return stream_expand(base_dir, Path(out), placement, family, force=force, progress=progress,
                         base_ref=str(base_dir), before_publish=structure, durable=durable, prove=prove)


def strip(expanded: str, out: str, force: bool = False, progress: bool = True) -> dict:
    """Remove the recorded new blocks of ``expanded`` into ``out``: the base comes back (see
    ``streaming.stream_strip``)."""
    return stream_strip(Path(expanded), Path(out), force=force, progress=progress)


def summary(meta: dict) -> str:
    """What an expansion did and proved, in a few lines for a terminal."""
    v = meta.get("verification") or {}
    lines = [
        f"base         {meta['base']['path']} ({meta['base']['model_type']}, {meta['num_original_layers']} layers)",
        f"strategy     {meta['strategy']}: {meta['num_new_layers']} new blocks -> {meta['num_layers']} layers",
        f"new layers   {meta['new_layer_indices']}",
        f"zeroed       {', '.join(meta['zeroed_in_new_blocks'])}",
        f"config       {', '.join(meta['config_keys_changed'])} updated",
    ]
    sc = meta.get("structure_check") or {}
    if sc.get("ok"):
        lines.append(f"structure    every layer of {sc['layers_checked']} built by transformers from the new "
                     "config has its source layer's tensors"
                     + (" (remembered from an identical earlier expansion)" if sc.get("cached") else ""))
    if v.get("status") == "unproven":
        lines.append(f"identity     UNPROVEN ({v.get('reason')}): run `{v.get('how_to_prove')}`; "
                     "training refuses it until then unless --allow-unproven")
    elif v.get("kind") == "tensors":
        lines.append(f"identity     PROVEN on the tensors: {v.get('statement', '')}")
    elif v:
        lines.append(
            f"identity     {'PROVEN' if v['ok'] else 'FAILED'}: max |dlogits| = {v['max_abs_logit_diff']:.3g} "
            f"({'bit-identical' if v['bit_identical_logits'] else 'not bit-identical'}) over "
            f"{v['prompt_tokens']} prompt tokens; greedy generation with KV cache "
            f"{'identical' if v['greedy_generation_equal'] else 'DIFFERS'} on {v['prompts']} prompts"
        )
    return "\n".join(lines)


def dumps(obj) -> str:
    """JSON for the CLI's --json output."""
    return json.dumps(obj, indent=2, default=str)
