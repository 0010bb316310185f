"""Model cards: the ``README.md`` written beside every published artifact (the standard export
and its fused and quantized variants, an expansion pack, a GGUF file), each from the artifact's
lineage record (``llamapro.json`` / ``pack.json``) and, where there is one, the run's evaluation."""

from __future__ import annotations

from pathlib import Path

import yaml

from llamapro.artifacts import BaseRecord, EvalResults, ExpansionMetadata, TrainingRecord
from llamapro.report import curve_table, md_table, strip_verdict

CARD_FILE = "README.md"
CURVE_PNG = "alpha_curve.png"


# --- the standard export (also fused and quantized) -------------------------------------------------

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
    training = ExpansionMetadata.of(meta).training or {}
    data = training.get("data") or meta.get("data")
    if data is None and run is not None:
        for name in ("config.yaml", "config.json", "llamapro_config.yaml", "llamapro_config.json"):
            p = run / name
            if p.is_file():
                try:
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
    meta, results = ExpansionMetadata.of(meta), EvalResults.of(results)
    base = meta.base or BaseRecord()
    training = meta.training or TrainingRecord()
    hub = base_model or _hub_id(base.path)
    fm = ["---"]
    if hub:
        fm.append(f"base_model: {hub}")
    if license:
        fm.append(f"license: {license}")
    fm += ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "- llamapro",
           "- llama-pro", "- block-expansion"]
    if base.model_type:
        fm.append(f"- {base.model_type}")
    fm.append("---")
    name = export_info.get("name", "model")
    n_new = len(meta.new_layer_indices)
    L = fm + ["", f"# {name}", ""]
    if n_new:
        L += [f"{base.get('model_type', 'A')} model grown from {meta.get('num_original_layers', '?')} to "
              f"{meta.get('num_layers', '?')} layers with LLaMA-Pro block expansion (Wu et al., 2024): "
              f"{n_new} identity-initialised decoder blocks were inserted and "
              + ("only they were trained; the original layers are bit-identical to the base."
                 if training.originals_frozen else "trained.") + " Exported by llamapro.", ""]
    else:
        L += ["Exported by llamapro.", ""]
    L += ["## Lineage", "", "| | |", "|---|---|",
          f"| base model | {hub or base.get('path', '?')} |",
          f"| base path when trained | `{base.get('path', '?')}` |",
          f"| base fingerprint | `{base.get('fingerprint', '?')}` |",
          f"| layers | {meta.get('num_original_layers', '?')} original + {n_new} inserted = "
          f"{meta.get('num_layers', '?')} |",
          f"| inserted positions | {meta.new_layer_indices} |",
          f"| each copied from original layer | {meta.new_layer_sources} |",
          f"| strategy | {meta.get('strategy', '?')} |",
          f"| training mode | {training.get('mode', 'not trained')} |",
          f"| originals frozen | {training.get('originals_frozen', '?')} |",
          f"| export fingerprint | `{export_info.get('fingerprint', '?')}` |",
          f"| dtype | {export_info.get('dtype', '?')} |",
          f"| merged adapter | {export_info.get('merged_adapter') or 'none'} |"]
    fusion = meta.fusion
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
    stages = training.stages
    if stages:
        L += ["## Training stages", "", "| stage | name | trains layers | steps |", "|---|---|---|---|"]
        L += [f"| {s.get('index')} | {s.get('name', '')} | {s.get('layers')} | {s.get('steps')} |" for s in stages]
        L += ["", f"{training.get('steps', '?')} optimizer steps, {training.get('tokens', '?'):,} tokens, "
                  f"{training.get('train_seconds') or 0:,.0f} s; best held-out loss "
                  f"{training.get('best_eval_loss')}; early-stopped stages: "
                  f"{training.get('early_stopped_stages') or 'none'}."
              if isinstance(training.tokens, int) else "", ""]
    L += list(sections or [])
    L += ["## Evaluation", ""]
    if results and results.sets:
        L += ["| held-out set | role | base ppl | this model ppl | change |", "|---|---|---|---|---|"]
        L += [f"| {n} | {s['role']} | {s['base']['ppl']:.4g} | {s['trained']['ppl']:.4g} | {s['ppl_change']:+.2%} |"
              for n, s in results["sets"].items()]
        g = results.greedy
        if g:
            L += ["", f"Greedy answers on {g['prompts']} regression prompts agree with the base's "
                      f"exactly on {g['exact_match']:.0%} (mean prefix agreement {g['prefix_agreement']:.0%})."]
        gate = results.gate
        verdict = ("passed" if gate.get("passed") else "FAILED") if gate.get("enabled") else "disabled"
        L += ["", f"**Regression gate: {verdict}.** {strip_verdict(gate.get('summary', ''))}", ""]
    else:
        L += ["Not evaluated (no `llamapro eval` results with this run).", ""]
    L += ["## Usage", "", "```python",
          "from transformers import AutoModelForCausalLM, AutoTokenizer",
          f'tok = AutoTokenizer.from_pretrained("{name}")',
          f'model = AutoModelForCausalLM.from_pretrained("{name}")',
          "```", "", "A standard checkpoint: neither llamapro nor peft is needed to load it.", "",
          "## Rollback", ""]
    rb = (results.rollback if results else None) or {}
    if n_new and training.originals_frozen and export_info.get("dtype_kept"):
        L.append(f"`llamapro strip {name} BASE_AGAIN` removes layers {meta.new_layer_indices} and "
                 "gives back the base exactly (same fingerprint as above)"
                 + (", as the evaluation verified." if rb.get("equals_base") else "."))
    elif n_new:
        L.append("`llamapro strip` removes the inserted layers and restores the base's architecture; the "
                 "weights equal the base's only when the originals were frozen and the dtype kept.")
    else:
        L.append("No inserted layers are recorded; keep the base checkpoint as the rollback snapshot.")
    return "\n".join(L) + "\n"


# --- sections for the fused and quantized exports ----------------------------------------------------

def fusion_section(fusion: dict, with_png: bool) -> list[str]:
    """The model card's "Fusion" section (Markdown lines)."""
    L = ["## Fusion", ""]
    if fusion["method"] == "residual":
        L.append("`llamapro fuse --method residual`: the inserted blocks are kept as trained, in the "
                 "residual stream beside the original layers (the plain LLaMA-Pro result), with any "
                 "adapter merged: one standard checkpoint that needs no special inference engine.")
        return L + [""]
    L.append(f"`llamapro fuse --method weighted`: each inserted block is (1 - alpha) x its identity "
             f"initialisation + alpha x its trained weights (weight-space interpolation in the spirit "
             f"of WiSE-FT), with **alpha = {fusion['alpha']:g}**; alpha = 0 gives back the base "
             f"exactly, alpha = 1 the trained model. Identity initialisation: {fusion['identity_from']}. "
             f"{fusion['interpolated_tensors']} tensors were interpolated"
             + (" (the inserted blocks only)." if not fusion["originals_interpolated"] else
                " (the original layers too: they differed from the base)."))
    if fusion.get("curve"):
        L += ["", fusion["choice"], ""] + md_table(*curve_table(fusion))
        if with_png:
            L += ["", f"![perplexity against alpha]({CURVE_PNG})"]
    return L + [""]


def fused_results(fusion: dict, run_results: dict | None, chosen: dict | None) -> dict | None:
    """What the card's Evaluation section shows: the numbers of *this* model."""
    if chosen is not None:
        keep = {"rollback": run_results.get("rollback")} if run_results and not fusion["originals_interpolated"] else {}
        return {**keep, "sets": chosen["sets"], "greedy": chosen.get("greedy"), "gate": chosen["gate"]}
    if fusion["alpha"] == 1.0:
        return run_results  # the trained model itself: the run's evaluation applies
    if run_results and not fusion["originals_interpolated"]:
        return {"rollback": run_results.get("rollback")}
    return None


def quantization_section(scheme: str, quantized_linears: int) -> list[str]:
    """The model card's "Quantization" section of a torchao export (Markdown lines)."""
    return ["## Quantization", "",
            f"torchao {scheme} weight-only ({quantized_linears} "
            "linear layers); `pip install torchao` to load. ", ""]


# --- an expansion pack and a GGUF file --------------------------------------------------------------

def pack_card(info: dict) -> str:
    """The README.md of an expansion pack, from its ``pack.json``."""
    b, lin, tr = info["base"], info["lineage"], info["lineage"].get("training") or {}
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- llamapro", "- llama-pro", "- expansion-pack", "---", "",
        f"# {info['name']} (llamapro expansion pack)", "",
        f"{len(info['positions'])} decoder blocks trained with LLaMA-Pro block expansion, without the "
        f"{b.get('num_layers')} frozen original layers they were trained between: "
        f"{info['blocks']['bytes'] / 1e6:.1f} MB. Apply to the base to get the trained model back, "
        "tensor for tensor:", "",
        "```", f"llamapro apply BASE {info['name']} OUT", "```", "",
        "| | |", "|---|---|",
        f"| base | `{b.get('path')}` ({b.get('model_type')}, {b.get('num_layers')} layers) |",
        f"| base fingerprint | `{b['fingerprint']}` |",
        f"| base config digest | `{b['config_digest']}` |",
        f"| positions in the trained model | {info['positions']} of {info['num_layers']} layers |",
        f"| each copied from original layer | {info.get('sources')} |",
        f"| generation | {lin.get('generation')} |",
        f"| training | {tr.get('mode', 'not trained')}, {tr.get('steps', '?')} steps, originals frozen: "
        f"{tr.get('originals_frozen', '?')} |",
        f"| trained model fingerprint | `{info['trained']['fingerprint']}` |",
        f"| pack id | `{info['id']}` |", "",
        "`apply` refuses a base with another fingerprint. Several packs stack in command-line order; "
        "`llamapro strip MODEL OUT --pack NAME` removes any one of them again.", ""])


def gguf_card(meta: dict, x: dict) -> str:
    """The README.md of a GGUF export, from its lineage and the writer's result ``x``."""
    new = ExpansionMetadata.of(meta).new_layer_indices
    grown = (f" grown with LLaMA-Pro block expansion ({len(new)} inserted blocks at "
             f"{new})" if new else "")
    return "\n".join([
        "---", "tags:", "- llamapro", "- gguf", "---", "", f"# {x['name']}", "",
        f"A {x['arch']} model{grown}, as one GGUF file (`{x['file']}`, {x['quant'].upper()}) for "
        "llama.cpp, Ollama or transformers. Exported by llamapro.", "",
        "```sh", f"llama-cli -m {x['file']} -cnv", "ollama create mymodel -f Modelfile", "```", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{x["file"]}")',
        f'tok = AutoTokenizer.from_pretrained(".", gguf_file="{x["file"]}")', "```", "",
        f"Tensor types: {x['tensor_types']}. Pre-tokenizer: `{x['tokenizer_pre']}`. Chat template "
        f"embedded: {'yes' if x['chat_template'] else 'no'}.", ""])
