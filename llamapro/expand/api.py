"""The expansion steps as functions: what `llamapro expand / verify / strip` and `jobs/` call.

expand = plan placement -> stream tensors to disk -> check the new config builds exactly the tensors
written -> read back the zeroed writers -> prove identity numerically (logits and greedy generation
with a KV cache against the base). Every number lands in the checkpoint's ``llamapro.json``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from llamapro.artifacts import require_metadata, write_metadata
from llamapro.errors import CheckpointError
from llamapro.expand.streaming import stream_expand, stream_strip
from llamapro.tensors import read_config, tensor_table, write_json_atomic
from llamapro.expand.families import expand_config, family_for, num_layers_of
from llamapro.expand.strategies import plan
from llamapro.errors import IdentityError, UnprovenError  # noqa: F401

log = logging.getLogger(__name__)

# Real prompts of different kinds; the chat template is applied when the tokenizer has one.
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "Explain in one sentence why the sky is blue.",
    "Translate to French: The weather is nice today.",
)


def resolve_local(model: str) -> Path:
    """A base given as the demo alias, a local directory, or a hub id (downloaded when reachable)."""
    from llamapro.demo import resolve_model

    ref = resolve_model(model)
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{ref} is a file; give the model's directory")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                               "*.model", "*.jinja", "*.tiktoken"]))
        except Exception as e:  # offline, unknown repo, gated ...
            raise CheckpointError(f"{ref!r} is not a local directory and could not be fetched from "
                                  f"the hub ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"model path {ref!r} does not exist")


def check_structure(base_config: dict, expanded_config: dict, new_sources: dict,
                    trust_remote_code: bool = False) -> dict:
    """Build base and expanded models from their configs on the meta device (no memory, any size)
    and check that every layer of the expanded model has exactly the parameter names and shapes of
    the base layer it came from. Catches a per-layer config rule we did not rewrite (a new block
    whose MLP kind or attention shape the config would change), which no key mapping can see.
    Needs only the two configs, so it runs before (and overlapping) the copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamapro.expand.surgery import find_layers

    def layer_shapes(d):
        d = {k: v for k, v in d.items() if k not in ("transformers_version",)}
        cfg = AutoConfig.for_model(**d) if not trust_remote_code else AutoConfig.for_model(**d)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        return [{n: tuple(p.shape) for n, p in l.named_parameters()} for l in find_layers(m)[1]]

    base, exp = layer_shapes(base_config), layer_shapes(expanded_config)
    sources = {int(k): v for k, v in new_sources.items()}
    o = 0
    for i, shapes in enumerate(exp):
        src = sources.get(i)
        if src is None:
            src, o = o, o + 1
        if shapes != base[src]:
            diff = sorted(set(shapes.items()) ^ set(base[src].items()))[:4]
            raise CheckpointError(
                f"with the expanded config, layer {i} would not have the structure of base layer "
                f"{src} (differences: {diff}). The model has a per-layer config rule llamapro does "
                "not rewrite; nothing was written. Please report it."
            )
    return {"layers_checked": len(exp), "ok": True}


def _structure_cache_file(base_config: dict, expanded_config: dict, new_sources: dict,
                          trust_remote_code: bool) -> Path | None:
    """Where a passed structure check of exactly these inputs is remembered, or None (remote code,
    which can change under the same config, or ``LLAMAPRO_STRUCTURE_CACHE=0``).

    The answer is a function of the two configs, the new blocks' sources and the code that builds
    the model, so the key holds all of them: both configs, the sources, the versions of
    transformers and torch, size and mtime of the transformers files that decide the layer
    structure (so an edited or editable install misses), and the source of this check. Found
    without importing transformers, which is the cost the cache saves."""
    import hashlib
    import importlib.metadata
    import importlib.util

    if trust_remote_code or os.environ.get("LLAMAPRO_STRUCTURE_CACHE", "1").lower() in ("0", "false", "no"):
        return None
    try:
        spec = importlib.util.find_spec("transformers")
        pkg = Path(spec.submodule_search_locations[0])
        versions = {d: importlib.metadata.version(d) for d in ("transformers", "torch")}
    except Exception:  # an unusual install: no cache, the check itself says what is wrong
        return None
    code = {}
    for mt in {str(c.get("model_type", "")) for c in (base_config, expanded_config)}:
        for rel in ("modeling_utils.py", "configuration_utils.py", "modeling_layers.py",
                    f"models/{mt}/modeling_{mt}.py", f"models/{mt}/configuration_{mt}.py",
                    "models/auto/modeling_auto.py", "models/auto/configuration_auto.py"):
            try:
                st = (pkg / rel).stat()
                code[rel] = [st.st_size, st.st_mtime_ns]
            except OSError:
                code[rel] = None
    here = Path(__file__).resolve().parent
    own = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("api.py", "surgery.py"))).hexdigest()

    def unversioned(c):
        return {k: v for k, v in c.items() if k != "transformers_version"}

    key = json.dumps({"base": unversioned(base_config), "expanded": unversioned(expanded_config),
                      "sources": {str(k): v for k, v in new_sources.items()}, "versions": versions,
                      "code": code, "package": str(pkg), "check": own}, sort_keys=True, default=str)
    from llamapro.config import default_cache_dir

    return default_cache_dir() / "structure" / (hashlib.sha256(key.encode()).hexdigest() + ".json")


def _structure_cached(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())["result"]
        if result.get("ok") is True and isinstance(result.get("layers_checked"), int):
            return {**result, "cached": True}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    log.info("ignoring an unreadable structure-check cache entry %s; checking again", path)
    return None


def _structure_remember(path: Path | None, result: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"result": result, "checked_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as e:  # a read-only cache costs only the next check's time
        log.info("could not remember the structure check in %s: %s", path, e)


def check_structure_isolated(base_config: dict, expanded_config: dict, new_sources: dict,
                             trust_remote_code: bool = False, isolate: bool | None = None) -> dict:
    """``check_structure``, remembered, and in a child Python when this process has not imported
    transformers.

    A passed check is remembered in ``$LLAMAPRO_CACHE/structure/`` under a key of everything its
    answer depends on (see ``_structure_cache_file``); expanding the same model with the same plan
    again (a retried job, ``--force``, a repeated Tune configuration) skips the import, and the
    result says ``cached: true``. Failures are never remembered. ``LLAMAPRO_STRUCTURE_CACHE=0``
    turns this off.

    The check is almost all import time (torch + transformers: ~4 s of CPU-bound Python). In a
    thread of this process it holds the GIL, which the copy beside it needs back after each
    ``copy_file_range``; a child has its own interpreter, and runs at low priority (in the
    benchmark at 8 GB the check took 9.7 s as a thread, 6.1 s as a child). When
    transformers is already loaded (a pipeline, a test) the check costs well under a second here
    (``isolate=None`` decides so; True/False force it).
    """
    cache = _structure_cache_file(base_config, expanded_config, new_sources, trust_remote_code)
    hit = _structure_cached(cache)
    if hit is not None:
        return hit
    result = {**_check_structure_somewhere(base_config, expanded_config, new_sources,
                                           trust_remote_code, isolate), "cached": False}
    _structure_remember(cache, {k: v for k, v in result.items() if k != "cached"})
    return result


def _check_structure_somewhere(base_config, expanded_config, new_sources, trust_remote_code,
                               isolate) -> dict:
    if isolate is False or (isolate is None and "transformers.modeling_utils" in sys.modules):
        return check_structure(base_config, expanded_config, new_sources, trust_remote_code)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [pkg_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    request = json.dumps({"base": base_config, "expanded": expanded_config, "sources": new_sources,
                          "trust_remote_code": trust_remote_code})
    proc = subprocess.run([sys.executable, "-c", "from llamapro.expand.api import _structure_child; "
                           "_structure_child()"], input=request, capture_output=True, text=True,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STRUCTURE ")]
    if not lines:
        raise CheckpointError(f"the structure check's child process failed (exit {proc.returncode}); "
                              f"nothing was written. Its output:\n{(proc.stderr or proc.stdout)[-2000:]}")
    answer = json.loads(lines[-1][len("STRUCTURE "):])
    if "error" in answer:
        if answer["type"] == "CheckpointError":
            raise CheckpointError(answer["error"])
        raise CheckpointError(f"transformers could not build the model from the expanded config "
                              f"({answer['type']}: {answer['error']}); nothing was written")
    return answer["result"]


def _structure_child() -> None:
    """Entry point of ``check_structure_isolated``'s child: a JSON request on stdin, one
    ``STRUCTURE {json}`` line on stdout."""
    req = json.load(sys.stdin)
    if hasattr(os, "nice"):  # the copy beside it is the critical path: yield the CPU to it
        os.nice(19)
    try:
        out = {"result": check_structure(req["base"], req["expanded"], req["sources"],
                                         req["trust_remote_code"])}
    except Exception as e:  # reported to the parent, which raises
        out = {"error": str(e), "type": type(e).__name__}
    print("STRUCTURE " + json.dumps(out), flush=True)


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


def _load(model_dir, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code).eval()


def _prompt_batches(model_dir: Path, prompts, vocab: int):
    """Token id tensors for each prompt (chat template when the tokenizer has one); random ids
    when the checkpoint has no tokenizer (tiny test models)."""
    import torch

    tok = None
    if any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                     "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (1, 16), generator=g) for _ in range(len(prompts))], None
    for p in prompts:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(p, return_tensors="pt")["input_ids"]
        out.append(ids)
    return out, tok


def verify_checkpoint(expanded: str, base: str | None = None, prompts=DEFAULT_PROMPTS,
                      max_new_tokens: int = 16, tolerance: float = 1e-5,
                      trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Prove that the expanded checkpoint computes what its base computed; record the numbers.

    Reference: ``base`` if given, else the recorded base path if it still exists, else the expanded
    model itself with its new blocks skipped (which holds the base's tensors). Raises
    :class:`IdentityError` if identity fails (after recording the failure).
    """
    import torch

    from llamapro.expand.surgery import check_identity

    exp_dir = Path(expanded)
    meta = require_metadata(exp_dir)
    new_idx = meta["new_layer_indices"]
    ref = base or (meta.get("base") or {}).get("path")
    base_dir = None
    if ref:
        try:
            base_dir = resolve_local(ref)
        except CheckpointError:
            base_dir = None
    model = _load(exp_dir, trust_remote_code)
    base_model = _load(base_dir, trust_remote_code) if base_dir else None
    batches, tok = _prompt_batches(exp_dir, prompts, model.config.vocab_size)
    worst, bit, gen_ok, toks, gen_toks, samples = 0.0, True, True, 0, 0, []
    from tqdm.auto import tqdm

    for ids in tqdm(batches, desc="verify", unit="prompt", disable=not progress):
        rep = check_identity(model, new_idx, base=base_model, input_ids=ids,
                             max_new_tokens=max_new_tokens, tolerance=tolerance)
        worst = max(worst, rep.max_abs_logit_diff)
        bit &= rep.bit_identical
        gen_ok &= rep.generation_equal
        toks += rep.tokens_compared
        gen_toks += rep.generated_tokens
        if tok is not None and len(samples) < 2:
            with torch.no_grad():
                g = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
            samples.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    result = {
        "ok": worst <= tolerance and gen_ok,
        "reference": str(base_dir) if base_dir else "expanded model with new blocks skipped",
        "max_abs_logit_diff": worst,
        "bit_identical_logits": bit,
        "greedy_generation_equal": gen_ok,
        "prompts": len(batches),
        "prompt_tokens": toks,
        "generated_tokens_per_prompt": max_new_tokens,
        "tolerance": tolerance,
        "sample_generations": samples,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta["verification"] = result
    write_metadata(exp_dir, meta)
    if not result["ok"]:
        raise IdentityError(
            f"{exp_dir} is NOT an identity of its base: max |dlogits| = {worst:.3g} "
            f"(tolerance {tolerance}), greedy generation equal: {gen_ok}"
        )
    return meta


def require_proven(meta: dict | None, allow_unproven: bool = False, where: str = "the model") -> None:
    """Refuse an expansion (metadata with new layers) whose identity proof did not pass.

    ``verification`` missing, None, skipped (``status: unproven``: too large, or ``--no-verify``)
    and failed all count as unproven. A model without inserted layers (a baseline's base) has
    nothing to prove. ``allow_unproven`` (``--allow-unproven``, ``train.allow_unproven``) lets it
    through with a warning.
    """
    if not meta or not meta.get("new_layer_indices"):
        return
    v = meta.get("verification")
    if isinstance(v, dict) and v.get("ok") is True:
        return
    if not isinstance(v, dict):
        why = "its identity proof never ran or never finished (no verification recorded)"
    elif v.get("status") == "unproven":
        why = f"its identity proof was skipped ({v.get('reason')})"
    else:
        why = (f"its identity proof FAILED (max |dlogits| = {v.get('max_abs_logit_diff')}, greedy "
               f"generation equal: {v.get('greedy_generation_equal')})")
    if allow_unproven:
        log.warning("training %s although %s (allowed by allow_unproven)", where, why)
        return
    raise UnprovenError(
        f"{where} is an unproven expansion: {why}. Prove it with `llamapro verify <model dir>` "
        "(or expand again), or train anyway with `llamapro train --allow-unproven` "
        "(config: train.allow_unproven: true).")


def strip(expanded: str, out: str, force: bool = False, progress: bool = True) -> dict:
    return stream_strip(Path(expanded), Path(out), force=force, progress=progress)


def summary(meta: dict) -> str:
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
    return json.dumps(obj, indent=2, default=str)
