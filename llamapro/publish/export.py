"""``llamapro export RUN_OR_CHECKPOINT OUT``: a clean standard Hugging Face directory.

safetensors shards (``max_shard_size``), config with the right layer count, tokenizer, chat
template and generation config, ``llamapro.json`` (lineage plus what the export did) and a model
card ``README.md``: base fingerprint, inserted positions, strategy, data mixture, stages, metrics
and the regression gate's verdict. PEFT/LoRA adapters found with the checkpoint are merged, so the
result loads in plain ``transformers`` without llamapro or peft.

The export is written to a temporary sibling of OUT and renamed into place
(:func:`llamapro.checkpoint.atomic_dir`): an interrupted export leaves the previous OUT intact, and
an existing OUT is only replaced with ``force``. With the originals frozen and the dtype kept,
``llamapro strip OUT BASE_AGAIN`` on the export gives back the base bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from llamapro.checkpoint import (
    METADATA_FILE,
    METADATA_VERSION,
    CheckpointError,
    atomic_dir,
    copy_side_files,
    fingerprint,
    read_config,
    read_metadata,
    weight_files,
    write_metadata,
)
from llamapro.expand.families import num_layers_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
CARD_FILE = "README.md"


def locate_source(src) -> tuple[Path | None, Path]:
    """(run dir or None, checkpoint dir). A run dir holds model/; a checkpoint holds config.json
    or (a pure adapter) adapter_config.json."""
    p = Path(src)
    if (p / "model" / "config.json").is_file() or (p / "model" / ADAPTER_CONFIG).is_file():
        return p, p / "model"
    if (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file():
        run = p.parent if (p.parent / "metrics.jsonl").is_file() else None
        return run, p
    raise CheckpointError(f"{p} is neither a run directory (with model/) nor a model directory "
                          "(with config.json or adapter_config.json)")


def find_adapter(ckpt: Path) -> Path | None:
    """A PEFT adapter with the checkpoint: in the directory itself or an ``adapter/`` subfolder."""
    for d in (ckpt, ckpt / "adapter"):
        if (d / ADAPTER_CONFIG).is_file():
            if not (d / "adapter_model.safetensors").is_file():
                raise CheckpointError(f"{d}: adapter_config.json without adapter_model.safetensors "
                                      "(llamapro reads adapter weights only from safetensors)")
            return d
    return None


def _weights_view(ckpt: Path) -> Path:
    """A temporary directory of symlinks to ``ckpt`` minus adapter files, so transformers loads
    the full weights themselves (beside an adapter_config.json it would load the adapter's
    recorded base instead)."""
    view = Path(tempfile.mkdtemp(prefix="llamapro-export-view-"))
    for f in ckpt.iterdir():
        if f.is_file() and f.name not in ADAPTER_FILES:
            os.symlink(f.resolve(), view / f.name)
    return view


def load_merged(ckpt: Path, dtype: str = "auto", trust_remote_code: bool = False, say=None):
    """The model to export, adapters merged. Returns (model, info about what was merged)."""
    import torch
    from transformers import AutoModelForCausalLM

    say = say or (lambda m: None)
    td = "auto" if dtype == "auto" else getattr(torch, dtype)
    adapter = find_adapter(ckpt)
    info = {"merged_adapter": None, "weights_from": str(ckpt)}
    if adapter is None:
        weight_files(ckpt)  # clear errors for missing / pickle-only weights
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=td, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        return model.eval(), info
    try:
        from peft import PeftModel
    except ImportError as e:
        raise CheckpointError(f"{adapter} holds a PEFT adapter; merging it needs `pip install peft`") from e
    if (ckpt / "config.json").is_file():
        base_dir, view = ckpt, _weights_view(ckpt)
    else:  # a pure adapter: its base is recorded in adapter_config.json
        ref = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not ref or not Path(ref).is_dir():
            raise CheckpointError(f"{adapter} is an adapter whose base model {ref!r} is not a local "
                                  "directory; export needs the base weights to merge into")
        base_dir, view = Path(ref), None
    try:
        weight_files(base_dir)
        say(f"merging adapter {adapter} into {base_dir}")
        model = AutoModelForCausalLM.from_pretrained(str(view or base_dir), dtype=td, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
    info.update(merged_adapter=str(adapter), weights_from=str(base_dir))
    return model.eval(), info


# --- model card -----------------------------------------------------------------------------------

def _hub_id(ref: str | None) -> str | None:
    if not ref:
        return None
    s = str(ref)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists():
        return s
    return None


def data_mixture(meta: dict, run: Path | None) -> list[dict] | None:
    """The training data mixture when recorded: metadata ``training.data`` / ``data``, or the run's
    config snapshot (``RUN/config.yaml`` / ``RUN/config.json``) ``data.sources``."""
    training = meta.get("training") or {}
    data = training.get("data") or meta.get("data")
    if data is None and run is not None:
        for name in ("config.yaml", "config.json", "llamapro_config.yaml", "llamapro_config.json"):
            p = run / name
            if p.is_file():
                try:
                    import yaml

                    data = (yaml.safe_load(p.read_text()) or {}).get("data")
                except Exception:
                    data = None
                if data:
                    break
    sources = (data or {}).get("sources") if isinstance(data, dict) else data
    if not sources or not isinstance(sources, list):
        return None
    total = sum(float(s.get("weight", 1.0)) for s in sources if isinstance(s, dict)) or 1.0
    return [{"name": s.get("name", "?"), "weight": float(s.get("weight", 1.0)),
             "share": float(s.get("weight", 1.0)) / total, "kind": s.get("kind", "text"),
             "paths": s.get("paths", [])} for s in sources if isinstance(s, dict)]


def model_card(meta: dict, export_info: dict, results: dict | None, mixture: list | None,
               base_model: str | None = None, license: str | None = None,
               sections: list[str] | None = None) -> str:
    """The README.md of an export; ``sections`` (Markdown lines, e.g. the fusion's) go before
    the evaluation."""
    base = meta.get("base") or {}
    training = meta.get("training") or {}
    hub = base_model or _hub_id(base.get("path"))
    fm = ["---"]
    if hub:
        fm.append(f"base_model: {hub}")
    if license:
        fm.append(f"license: {license}")
    fm += ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "- llamapro",
           "- llama-pro", "- block-expansion"]
    if base.get("model_type"):
        fm.append(f"- {base['model_type']}")
    fm.append("---")
    name = export_info.get("name", "model")
    n_new = len(meta.get("new_layer_indices") or [])
    L = fm + ["", f"# {name}", ""]
    if n_new:
        L += [f"{base.get('model_type', 'A')} model grown from {meta.get('num_original_layers', '?')} to "
              f"{meta.get('num_layers', '?')} layers with LLaMA-Pro block expansion (Wu et al., 2024): "
              f"{n_new} identity-initialised decoder blocks were inserted and "
              + ("only they were trained; the original layers are bit-identical to the base."
                 if training.get("originals_frozen") else "trained.") + " Exported by llamapro.", ""]
    else:
        L += ["Exported by llamapro.", ""]
    L += ["## Lineage", "", "| | |", "|---|---|",
          f"| base model | {hub or base.get('path', '?')} |",
          f"| base path when trained | `{base.get('path', '?')}` |",
          f"| base fingerprint | `{base.get('fingerprint', '?')}` |",
          f"| layers | {meta.get('num_original_layers', '?')} original + {n_new} inserted = {meta.get('num_layers', '?')} |",
          f"| inserted positions | {meta.get('new_layer_indices', [])} |",
          f"| each copied from original layer | {meta.get('new_layer_sources', {})} |",
          f"| strategy | {meta.get('strategy', '?')} |",
          f"| training mode | {training.get('mode', 'not trained')} |",
          f"| originals frozen | {training.get('originals_frozen', '?')} |",
          f"| export fingerprint | `{export_info.get('fingerprint', '?')}` |",
          f"| dtype | {export_info.get('dtype', '?')} |",
          f"| merged adapter | {export_info.get('merged_adapter') or 'none'} |"]
    fusion = meta.get("fusion")
    if fusion:
        L.append(f"| fusion | {fusion['method']}, alpha {fusion['alpha']:g}"
                 + (" (chosen by the regression gate)" if fusion.get("curve") else "") + " |")
    L += ["", "## Data mixture", ""]
    if mixture:
        L += ["| source | kind | weight | share | paths |", "|---|---|---|---|---|"]
        L += [f"| {m['name']} | {m['kind']} | {m['weight']:g} | {m['share']:.0%} | {', '.join(map(str, m['paths']))} |"
              for m in mixture]
    else:
        L.append("Not recorded with this checkpoint.")
    L.append("")
    stages = training.get("stages") or []
    if stages:
        L += ["## Training stages", "", "| stage | name | trains layers | steps |", "|---|---|---|---|"]
        L += [f"| {s.get('index')} | {s.get('name', '')} | {s.get('layers')} | {s.get('steps')} |" for s in stages]
        L += ["", f"{training.get('steps', '?')} optimizer steps, {training.get('tokens', '?'):,} tokens, "
                  f"{training.get('train_seconds') or 0:,.0f} s; best held-out loss "
                  f"{training.get('best_eval_loss')}; early-stopped stages: "
                  f"{training.get('early_stopped_stages') or 'none'}."
              if isinstance(training.get("tokens"), int) else "", ""]
    L += list(sections or [])
    L += ["## Evaluation", ""]
    if results and results.get("sets"):
        L += ["| held-out set | role | base ppl | this model ppl | change |", "|---|---|---|---|---|"]
        L += [f"| {n} | {s['role']} | {s['base']['ppl']:.4g} | {s['trained']['ppl']:.4g} | {s['ppl_change']:+.2%} |"
              for n, s in results["sets"].items()]
        g = results.get("greedy")
        if g:
            L += ["", f"Greedy answers on {g['prompts']} regression prompts agree with the base's "
                      f"exactly on {g['exact_match']:.0%} (mean prefix agreement {g['prefix_agreement']:.0%})."]
        gate = results.get("gate") or {}
        from llamapro.report import _strip_verdict

        verdict = ("passed" if gate.get("passed") else "FAILED") if gate.get("enabled") else "disabled"
        L += ["", f"**Regression gate: {verdict}.** {_strip_verdict(gate.get('summary', ''))}", ""]
    else:
        L += ["Not evaluated (no `llamapro eval` results with this run).", ""]
    L += ["## Usage", "", "```python",
          "from transformers import AutoModelForCausalLM, AutoTokenizer",
          f'tok = AutoTokenizer.from_pretrained("{name}")',
          f'model = AutoModelForCausalLM.from_pretrained("{name}")',
          "```", "", "A standard checkpoint: neither llamapro nor peft is needed to load it.", "",
          "## Rollback", ""]
    rb = (results or {}).get("rollback") or {}
    if n_new and training.get("originals_frozen") and export_info.get("dtype_kept"):
        L.append(f"`llamapro strip {name} BASE_AGAIN` removes layers {meta.get('new_layer_indices')} and "
                 "gives back the base exactly (same fingerprint as above)"
                 + (", as the evaluation verified." if rb.get("equals_base") else "."))
    elif n_new:
        L.append("`llamapro strip` removes the inserted layers and restores the base's architecture; the "
                 "weights equal the base's only when the originals were frozen and the dtype kept.")
    else:
        L.append("No inserted layers are recorded; keep the base checkpoint as the rollback snapshot.")
    return "\n".join(L) + "\n"


# --- the export -----------------------------------------------------------------------------------

def check_destination(src, out, force: bool = False) -> tuple[Path | None, Path, Path]:
    """(run dir or None, checkpoint dir, OUT) for writing ``src`` to ``out``; refuses, before any
    work, an OUT that is the source (or holds it) or that exists without ``force``."""
    run, ckpt = locate_source(src)
    out = Path(out)
    o, c = out.resolve(), ckpt.resolve()
    if o == c or o in c.parents or (run is not None and o == run.resolve()):
        raise CheckpointError(f"{out} is (or contains) the checkpoint being exported; choose another OUT")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists; choose another path or pass --force to replace it")
    return run, ckpt, out


def export(src, out, force: bool = False, max_shard_size: str = "2GB", dtype: str = "auto",
           trust_remote_code: bool = False, base_model: str | None = None, license: str | None = None,
           say=None) -> dict:
    """Export a run (RUN/model) or checkpoint to ``out``; returns the export metadata."""
    say = say or (lambda m: None)
    run, ckpt, out = check_destination(src, out, force)
    meta = read_metadata(ckpt) or {}
    results = None
    if run is not None:
        from llamapro.eval import read_results

        results = read_results(run)
    say(f"loading {ckpt}")
    model, info = load_merged(ckpt, dtype, trust_remote_code, say)
    return write_standard_dir(model, out, ckpt, run, meta, info, results, force=force,
                              max_shard_size=max_shard_size, dtype=dtype, base_model=base_model,
                              license=license, say=say)


def write_standard_dir(model, out: Path, ckpt: Path, run: Path | None, meta: dict, info: dict,
                       results: dict | None, *, force: bool = False, max_shard_size: str = "2GB",
                       dtype: str = "auto", base_model: str | None = None, license: str | None = None,
                       say=None, kind: str = "exported", extra_meta: dict | None = None,
                       card_sections: list[str] | None = None, extra_files: dict | None = None) -> dict:
    """Write the loaded ``model`` (from ``ckpt``) to ``out`` atomically: shards, side files,
    ``llamapro.json`` (``kind``, lineage, ``extra_meta``) and the model card. ``extra_files``
    maps a file name in OUT to a file to copy there. Returns the export metadata."""
    say = say or (lambda m: None)
    src_cfg_dtype = None
    if (ckpt / "config.json").is_file():
        cfg = read_config(ckpt)
        src_cfg_dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    out_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    c = ckpt.resolve()
    with atomic_dir(out, force=force) as tmp:
        say(f"writing safetensors shards (max {max_shard_size}) to {tmp.name}")
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if info["weights_from"] != str(ckpt):
            copy_side_files(Path(info["weights_from"]), tmp, skip=(CARD_FILE, *ADAPTER_FILES))
        copied = copy_side_files(ckpt, tmp, skip=(CARD_FILE, *ADAPTER_FILES))
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, tmp / name)
        cfg = read_config(tmp)
        n = num_layers_of(cfg)
        want = meta.get("num_layers")
        if want is not None and n != want:
            raise CheckpointError(f"export config has {n} layers but the metadata records {want}")
        weight_files(tmp)
        export_info = {
            "name": out.name, "from": str(c), "run": str(run.resolve()) if run else None,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": out_dtype, "dtype_kept": dtype == "auto" or out_dtype == src_cfg_dtype,
            "max_shard_size": str(max_shard_size), "num_layers": n,
            "merged_adapter": info["merged_adapter"], "side_files": copied,
            "shards": sorted(p.name for p in tmp.glob("*.safetensors")),
            "fingerprint": fingerprint(tmp),
            "gate": ({k: results["gate"][k] for k in ("enabled", "passed", "summary")}
                     if results and results.get("gate") else None),
        }
        new_meta = dict(meta) if meta else {"version": METADATA_VERSION, "new_layer_indices": [],
                                            "num_layers": n}
        new_meta["kind"] = kind
        new_meta["export"] = export_info
        new_meta.update(extra_meta or {})
        write_metadata(tmp, new_meta)
        (tmp / CARD_FILE).write_text(model_card(new_meta, export_info, results,
                                                data_mixture(meta, run), base_model, license,
                                                card_sections),
                                     encoding="utf-8")
    stale = sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))
    return {"out": str(out), "metadata_file": str(out / METADATA_FILE), **export_info,
            "stale_partial_exports": stale}


# --- other formats --------------------------------------------------------------------------------

FORMATS = ("hf", "gguf", "torchao-int8", "torchao-int4", "gptq", "awq")


def export_format(fmt: str, src, out, quant: str | None = None, force: bool = False,
                  trust_remote_code: bool = False, say=None) -> dict:
    """Export in a portable or quantized format (``hf`` is :func:`export`). Each writer checks
    the whole request before writing and publishes OUT atomically; the result has ``path`` (the
    file or directory to load) and ``bytes`` (its size on disk)."""
    if fmt == "gguf":
        from llamapro.publish.gguf import export_gguf

        return export_gguf(src, out, quant=quant or "f16", force=force,
                           trust_remote_code=trust_remote_code, say=say)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quant:
        raise CheckpointError(f"--quant applies to --format gguf only (got --format {fmt} --quant {quant})")
    from llamapro.publish import quant as quant_export

    if fmt.startswith("torchao-"):
        return quant_export.export_torchao(src, out, scheme=fmt.split("-", 1)[1], force=force,
                                           trust_remote_code=trust_remote_code, say=say)
    if fmt in ("gptq", "awq"):
        return quant_export.export_gptq(src, out, method=fmt, force=force,
                                        trust_remote_code=trust_remote_code, say=say)
    res = export(src, out, force=force, trust_remote_code=trust_remote_code, say=say)
    return {**res, "path": res["out"], "bytes": sum(p.stat().st_size for p in Path(out).iterdir())}
