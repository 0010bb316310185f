"""Evaluation after training: did the model learn the new domain, and did it keep what it knew?

For the trained checkpoint and its base, on each held-out set: token-level mean cross-entropy over
labelled positions (next-token shift, labels -100 ignored, exactly the training loss) and
perplexity = exp(loss). On a regression prompt set: greedy answers of both models, their
exact-match rate and mean longest-common-prefix share. With ``eval.battery`` on, the knowledge
battery (:mod:`llamapro.eval.battery`): zero-shot multiple-choice accuracy of both models on public
benchmarks, with 95% intervals and paired changes. Retention sets are named replayed (their text
was in the training mixture) or not replayed (``eval.gate.replayed_sets``); only the latter, and
the battery, measure forgetting. Then the regression gate
(:class:`~llamapro.config.eval.GateConfig`) decides; ``llamapro eval`` exits 4 when it fails.

The base is, by default, the trained model itself with the inserted blocks skipped: with the
originals frozen that computes exactly what the base computed, with one model in memory.

Held-out sets arrive as arrays, ``{name: {"input_ids": [[...]], "labels": [[...]]}}``, so the
numbers here never depend on Ray; :func:`heldout_from_config` materialises them from the data
pipeline (Ray Data). Results land in ``RUN/eval/results.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from llamapro.checkpoint import CheckpointError, read_metadata, weight_files, write_json_atomic
from llamapro.config.eval import EvalConfig, GateConfig, LmEvalConfig
from llamapro.errors import EvalError, LmEvalUnavailable  # noqa: F401

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
RESULTS_FILE = "results.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- inputs ---------------------------------------------------------------------------------------

def load_prompts(path, max_prompts: int = 0) -> list[dict]:
    """Regression prompts from a jsonl file: one object per line with a non-empty ``prompt``
    string; other fields (source, reference, ...) are carried into the results."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p  # the shipped default, from any working directory
    if not p.is_file():
        raise EvalError(f"regression prompt file {str(path)!r} does not exist "
                        "(eval.prompts; set it to \"\" to skip greedy agreement)")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise EvalError(f"{p}:{i}: each line must be an object with a non-empty \"prompt\" string")
        out.append(rec)
    if not out:
        raise EvalError(f"{p}: no prompts")
    return out[:max_prompts] if max_prompts else out


def _as_blocks(name: str, ids, labels=None) -> dict:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise EvalError(f"held-out set {name!r}: input_ids must be a non-empty 2-D array of blocks "
                        f"of at least 2 tokens, got shape {ids.shape}")
    labels = ids.copy() if labels is None else np.asarray(labels)
    if labels.shape != ids.shape:
        raise EvalError(f"held-out set {name!r}: labels shape {labels.shape} != input_ids {ids.shape}")
    if not (labels[:, 1:] != -100).any():
        raise EvalError(f"held-out set {name!r}: every label is -100; nothing to score")
    return {"input_ids": ids.astype(np.int64), "labels": labels.astype(np.int64)}


def load_heldout_file(name: str, path) -> dict:
    """A held-out set saved as arrays: ``.npz`` with ``input_ids`` (and ``labels``), or ``.jsonl``
    with one ``{"input_ids": [...], "labels": [...]}`` block per line (labels default to ids)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"held-out set {name!r}: {p} does not exist")
    if p.suffix == ".npz":
        with np.load(p) as z:
            if "input_ids" not in z:
                raise EvalError(f"{p}: no input_ids array")
            return _as_blocks(name, z["input_ids"], z["labels"] if "labels" in z else None)
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{p}:{i}: not valid JSON ({e.msg})") from None
    if not rows or any(not isinstance(r, dict) or "input_ids" not in r for r in rows):
        raise EvalError(f"{p}: expected jsonl rows with input_ids (and labels)")
    try:
        ids = np.array([r["input_ids"] for r in rows], dtype=np.int64)
        labels = np.array([r.get("labels", r["input_ids"]) for r in rows], dtype=np.int64)
    except ValueError:
        raise EvalError(f"{p}: every block must have the same length") from None
    return _as_blocks(name, ids, labels)


def blocks_from_dataset(ds, max_blocks: int, name: str = "held-out") -> dict:
    """The first ``max_blocks`` rows of a Ray Dataset of packed blocks as arrays."""
    rows = ds.take(max_blocks)
    if not rows:
        raise EvalError(f"held-out set {name!r} yielded no blocks (is its eval_fraction too small "
                        "for the corpus?)")
    return _as_blocks(name, np.stack([np.asarray(r["input_ids"]) for r in rows]),
                      np.stack([np.asarray(r["labels"]) for r in rows]))


def heldout_from_config(data_cfg, tokenizer_path, names: list[str], max_blocks: int) -> dict:
    """Held-out blocks of each named data source, through the Ray Data pipeline."""
    from llamapro.data import build_eval_dataset

    known = data_cfg.source_names()
    missing = [n for n in names if n not in known]
    if missing:
        raise EvalError(f"eval sets {missing} are not data sources (configured: {known or 'none'})")
    return {n: blocks_from_dataset(build_eval_dataset(data_cfg, tokenizer_path, n), max_blocks, n)
            for n in names}


# --- measurements ---------------------------------------------------------------------------------

def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def heldout_loss(model, blocks: dict, batch_size: int = 4) -> dict:
    """Token-level mean next-token cross-entropy over labelled positions, and perplexity."""
    import torch

    from llamapro.train import masked_ce_sum

    dev = next(model.parameters()).device
    ids, labels = blocks["input_ids"], blocks["labels"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x = torch.as_tensor(ids[i:i + batch_size], device=dev)
            y = torch.as_tensor(labels[i:i + batch_size], device=dev)
            s, n = masked_ce_sum(model(input_ids=x).logits, y)
            total += float(s)
            count += n
    loss = total / max(1, count)
    return {"loss": loss, "ppl": _ppl(loss), "tokens": count, "blocks": int(len(ids))}


def encode_prompts(tokenizer, prompts: list[dict], chat_template: bool = True) -> list:
    """Token id tensors (1 x n) per prompt; the chat template wraps it as a user turn when the
    tokenizer has one and ``chat_template`` is on."""
    out = []
    use_chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    for rec in prompts:
        if use_chat:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                                add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out.append(enc["input_ids"])
        else:
            out.append(tokenizer(rec["prompt"], return_tensors="pt")["input_ids"])
    return out


def greedy(model, batches: list, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation token ids per prompt (one prompt at a time: no padding effects)."""
    import torch

    from llamapro.expand.surgery import _pad_id

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(dev)
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               temperature=None, top_p=None, top_k=None,
                               pad_token_id=_pad_id(model))
            out.append(g[0, ids.shape[1]:].tolist())
    return out


def prefix_agreement(a: list, b: list) -> float:
    """Longest common prefix of two answers as a share of the longer one (1.0 if both empty)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k / n


def compare_sets(role: str, base: dict, trained: dict) -> dict:
    """One held-out set's entry of the results: base vs trained :func:`heldout_loss`."""
    return {"role": role, "blocks": trained["blocks"], "tokens": trained["tokens"],
            "base": {"loss": base["loss"], "ppl": base["ppl"]},
            "trained": {"loss": trained["loss"], "ppl": trained["ppl"]},
            "loss_change": trained["loss"] - base["loss"],
            "ppl_change": math.expm1(trained["loss"] - base["loss"])}


def greedy_summary(prompts: list[dict], tok, trained_ans: list, base_ans: list, max_new_tokens: int,
                   chat_template: bool) -> dict:
    """The ``greedy`` entry of the results: per-prompt answers of both models and their agreement."""
    items = []
    for rec, a, b in zip(prompts, trained_ans, base_ans):
        items.append({**rec, "base": tok.decode(b, skip_special_tokens=True),
                      "trained": tok.decode(a, skip_special_tokens=True),
                      "exact": a == b, "prefix_agreement": prefix_agreement(a, b),
                      "base_tokens": len(b), "trained_tokens": len(a)})
    return {
        "prompts": len(items), "max_new_tokens": max_new_tokens,
        "chat_template": bool(chat_template and getattr(tok, "chat_template", None)),
        "exact_match": sum(i["exact"] for i in items) / len(items),
        "prefix_agreement": sum(i["prefix_agreement"] for i in items) / len(items),
        "items": items}


# --- the gate -------------------------------------------------------------------------------------

def retention_label(name: str, s: dict) -> str:
    """"retention set NAME (not replayed)": which retention sets measure forgetting."""
    if s.get("replayed") is None:
        return f"retention set {name}"
    return f"retention set {name} ({'replayed in training' if s['replayed'] else 'not replayed'})"


NOT_SCORED = "not scored"
"""check_gate's default ``battery``: the caller gates perplexity and greedy answers only (fuse's
alpha curve); eval.gate.max_accuracy_drop is then not applied. ``None`` means the battery should
have been run and was not: an error."""


def check_gate(sets: dict, greedy_res: dict | None, gate: GateConfig,
               battery: dict | None | str = NOT_SCORED) -> dict:
    """Apply the thresholds. Each check has a plain sentence; ``summary`` is the one to print."""
    if not gate.enabled:
        return {"enabled": False, "passed": True, "checks": [],
                "summary": "Regression gate disabled (eval.gate.enabled=false): nothing was checked."}
    missing = [s for s in gate.gated_sets() if s not in sets]
    if missing:
        raise EvalError(f"eval.gate names sets {missing} that were not evaluated "
                        f"(evaluated: {sorted(sets)})")
    checks = []
    for name in gate.retention_sets:
        s = sets[name]
        thr = gate.max_retention_ppl_increase
        ok = s["ppl_change"] <= thr + 1e-12
        checks.append({
            "check": "max_retention_ppl_increase", "set": name, "value": s["ppl_change"],
            "threshold": thr, "passed": ok,
            "replayed": s.get("replayed"),
            "sentence": f"{retention_label(name, s)}: perplexity {s['base']['ppl']:.4g} -> "
                        f"{s['trained']['ppl']:.4g} ({s['ppl_change']:+.2%}), "
                        + ("within" if ok else "more than") + f" the allowed rise of {thr:.2%}"})
    for name in gate.domain_sets:
        s = sets[name]
        thr = gate.min_domain_ppl_decrease
        ok = -s["ppl_change"] >= thr - 1e-12
        checks.append({
            "check": "min_domain_ppl_decrease", "set": name, "value": -s["ppl_change"],
            "threshold": thr, "passed": ok,
            "sentence": f"domain set {name}: perplexity {s['base']['ppl']:.4g} -> "
                        f"{s['trained']['ppl']:.4g} ({s['ppl_change']:+.2%}), "
                        + ("meeting" if ok else "short of")
                        + (f" the required fall of at least {thr:.2%}" if thr > 0 else
                           " the requirement not to rise" if thr == 0 else
                           f" the allowed rise of at most {-thr:.2%}")})
    for key, metric, label in (("min_greedy_exact_match", "exact_match", "exact-match rate"),
                               ("min_greedy_prefix_agreement", "prefix_agreement",
                                "mean prefix agreement")):
        thr = getattr(gate, key)
        if thr <= 0:
            continue
        if not greedy_res:
            raise EvalError(f"eval.gate.{key} is {thr} but no regression prompts were evaluated "
                            "(set eval.prompts)")
        v = greedy_res[metric]
        checks.append({"check": key, "set": None, "value": v, "threshold": thr,
                       "passed": v >= thr - 1e-12,
                       "sentence": f"greedy answers on {greedy_res['prompts']} regression prompts: "
                                   f"{label} {v:.1%}, " + ("meeting" if v >= thr - 1e-12 else "below")
                                   + f" the required {thr:.1%}"})
    if gate.max_accuracy_drop is not None and battery is not NOT_SCORED:
        if not battery:
            raise EvalError("eval.gate.max_accuracy_drop is set but the knowledge battery was not "
                            "run (set eval.battery.enabled=true)")
        checks += battery_checks(battery, gate.max_accuracy_drop)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        summary = "Regression gate FAILED: " + "; ".join(c["sentence"] for c in failed) + "."
    elif checks:
        summary = f"Regression gate passed: all {len(checks)} checks met ({'; '.join(c['sentence'] for c in checks)})."
    else:
        summary = ("Regression gate passed vacuously: no sets or thresholds are configured "
                   "(set eval.gate.retention_sets and eval.gate.domain_sets).")
    return {"enabled": True, "passed": not failed, "checks": checks, "summary": summary}


def battery_checks(battery: dict, max_drop: float) -> list[dict]:
    """One check per battery task: it fails when the task's accuracy fell by more than
    ``max_drop`` AND the paired 95% interval of the change lies wholly below zero (not noise)."""
    from llamapro.eval.battery import format_change

    checks = []
    for name, e in battery["tasks"].items():
        v = e[e["metric"]]
        drop = -v["change"]
        real = v["ci"][1] < 0.0
        ok = not (drop > max_drop + 1e-12 and real)
        why = ("within" if drop <= max_drop + 1e-12 else
               "beyond the allowed drop but inside the noise, so" if not real else "more than")
        checks.append({"check": "max_accuracy_drop", "set": f"battery:{name}", "value": drop,
                       "threshold": max_drop, "passed": ok, "ci": v["ci"], "noise": v["noise"],
                       "sentence": f"knowledge battery {format_change(name, e)}, {why} the allowed "
                                   f"drop of {max_drop:.3f}"})
    return checks


# --- lm-evaluation-harness (optional) --------------------------------------------------------------

def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    if not lm_eval_available():
        raise LmEvalUnavailable(
            "eval.lm_eval.enabled is true but lm-evaluation-harness is not installed. Install it "
            "with `pip install lm-eval` (and keep the tasks' data on local disk), or set "
            "eval.lm_eval.enabled=false.")


def run_lm_eval(model, tokenizer, cfg: LmEvalConfig) -> dict:
    """Run local lm-eval tasks on an already loaded model; ``{task: {metric: value}}``."""
    require_lm_eval()
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # local task data only; never the hub
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=cfg.include_path or None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                  limit=cfg.limit or None, task_manager=tm, log_samples=False)
    return {task: {m: v for m, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in (res or {}).get("results", {}).items()}


# --- models ---------------------------------------------------------------------------------------

def _torch_dtype(name: str, cuda: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def load_model(model_dir, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM from safetensors only, on GPU when there is one, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    weight_files(Path(model_dir))  # refuses pickle-only / missing weights with a clear message
    cuda = torch.cuda.is_available()
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_torch_dtype(dtype, cuda),
                                             use_safetensors=True,
                                             trust_remote_code=trust_remote_code)
    return m.to("cuda" if cuda else "cpu").eval()


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                           "tokenizer_config.json"))


def resolve_base(checkpoint: Path, meta: dict | None, cfg: EvalConfig) -> dict:
    """How the base is obtained: ``{"mode": "skip"|"path", "path", "exact", "why"}``."""
    meta = meta or {}
    new_idx = list(meta.get("new_layer_indices") or [])
    training = meta.get("training") or {}
    frozen = bool(training.get("originals_frozen", meta.get("kind") == "expanded"))
    recorded = (meta.get("base") or {}).get("path")
    if not new_idx and training.get("trained_from"):
        recorded = recorded or training["trained_from"]  # a baseline run: trained from the base
    explicit = cfg.base or None
    skip_ok = bool(new_idx)
    if cfg.base_mode == "skip" or (cfg.base_mode == "auto" and not explicit and skip_ok and frozen):
        if not skip_ok:
            raise EvalError(f"{checkpoint} records no inserted layers: eval.base_mode=skip has "
                            "nothing to skip; give eval.base")
        return {"mode": "skip", "path": None, "exact": frozen,
                "why": "the trained model with its inserted blocks skipped"
                       + (" (originals frozen: exactly the base)" if frozen else
                          " (originals were trained: NOT exactly the base)")}
    path = explicit or recorded
    if path and Path(path).is_dir():
        return {"mode": "path", "path": str(path), "exact": True,
                "why": f"the base loaded from {path}"}
    if explicit or cfg.base_mode == "path":
        raise EvalError(f"base model {path!r} is not a directory (eval.base / eval.base_mode=path)")
    if skip_ok:
        return {"mode": "skip", "path": None, "exact": frozen,
                "why": f"the trained model with its inserted blocks skipped (base path "
                       f"{path!r} not found{'' if frozen else '; originals were trained, so NOT exactly the base'})"}
    raise EvalError(f"no base model to compare {checkpoint} with: {path!r} is not a directory. "
                    "Pass --base (eval.base).")


class BasePair:
    """The trained model, and a context manager that makes the base available."""

    def __init__(self, trained, new_idx, base_model=None):
        self.trained, self.new_idx, self.base_model = trained, list(new_idx), base_model

    @contextlib.contextmanager
    def base(self):
        if self.base_model is not None:
            yield self.base_model
        else:
            from llamapro.expand.surgery import skip_layers

            with skip_layers(self.trained, self.new_idx) as m:
                yield m


# --- the evaluation -------------------------------------------------------------------------------

def _rollback_check(checkpoint: Path, meta: dict, scratch: Path) -> dict:
    if not (meta or {}).get("new_layer_indices"):
        return {"applicable": False, "equals_base": False,
                "note": "no inserted blocks recorded: nothing to strip (a baseline run)"}
    from llamapro.expand.api import strip

    tmp = Path(tempfile.mkdtemp(prefix=".rollback-check-", dir=scratch))
    try:
        r = strip(str(checkpoint), str(tmp / "stripped"), progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"applicable": True, "equals_base": bool(r["equals_base"]),
            "base_fingerprint": r["base_fingerprint"], "stripped_fingerprint": r["fingerprint"],
            "removed_layers": r["removed_layers"]}


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch CPU threads = ``n`` inside the block (0: unchanged), restored after."""
    import torch

    threads = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def evaluate_checkpoint(checkpoint, heldout: dict, prompts: list[dict] | None, cfg: EvalConfig,
                        out_dir=None, trust_remote_code: bool = False, say=None,
                        replayed: dict[str, bool] | None = None) -> dict:
    """Evaluate ``checkpoint`` against its base; write ``out_dir/results.json`` if given.

    ``heldout`` maps a set name to ``{"input_ids", "labels"}`` arrays; ``prompts`` are records
    with a ``prompt`` (see :func:`load_prompts`). ``replayed`` says which sets were in the
    training mixture (eval.gate.replayed_sets overrides it). Returns the results dict.
    """
    say = say or (lambda m: None)
    t0 = time.perf_counter()
    ckpt = Path(checkpoint)
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: no config.json; give a trained model directory "
                              "(RUN/model) or a run directory")
    meta = read_metadata(ckpt) or {}
    heldout = {n: _as_blocks(n, b["input_ids"], b.get("labels")) for n, b in (heldout or {}).items()}
    if cfg.lm_eval.enabled:
        require_lm_eval()  # fail before loading anything
    battery_docs = None
    if cfg.battery.enabled:
        from llamapro.eval.battery import BatteryError, load_battery

        try:  # the data is fetched and checked before any model is loaded
            battery_docs = load_battery(cfg.battery, say)
        except BatteryError as e:
            raise EvalError(str(e)) from None
    missing = [s for s in (cfg.gate.gated_sets() if cfg.gate.enabled else []) if s not in heldout]
    if missing:
        raise EvalError(f"eval.gate names sets {missing} that have no held-out data "
                        f"(available: {sorted(heldout) or 'none'})")
    base_info = resolve_base(ckpt, meta, cfg)
    with torch_threads(cfg.num_threads):
        results = _evaluate(ckpt, meta, heldout, prompts, cfg, base_info, trust_remote_code, say,
                            battery_docs, replayed or {})
    results["eval_seconds"] = round(time.perf_counter() - t0, 3)
    if out_dir is not None:
        write_results(out_dir, results)
    return results


def _evaluate(ckpt: Path, meta: dict, heldout: dict, prompts, cfg: EvalConfig, base_info: dict,
              trust_remote_code: bool, say, battery_docs: dict | None = None,
              replayed: dict | None = None) -> dict:
    import torch

    say(f"loading {ckpt}")
    model = load_model(ckpt, cfg.dtype, trust_remote_code)
    base_model = None
    if base_info["mode"] == "path":
        say(f"loading base {base_info['path']}")
        base_model = load_model(base_info["path"], cfg.dtype, trust_remote_code)
    pair = BasePair(model, meta.get("new_layer_indices") or [], base_model)
    gate_roles = {**{s: "retention" for s in cfg.gate.retention_sets},
                  **{s: "domain" for s in cfg.gate.domain_sets}}

    sets = {}
    for name, blocks in heldout.items():
        say(f"held-out {name}: {len(blocks['input_ids'])} blocks x {blocks['input_ids'].shape[1]} tokens")
        tr = heldout_loss(model, blocks, cfg.batch_size)
        with pair.base() as b:
            ba = heldout_loss(b, blocks, cfg.batch_size)
        sets[name] = compare_sets(gate_roles.get(name, "other"), ba, tr)
        if sets[name]["role"] == "retention":
            sets[name]["replayed"] = (True if name in cfg.gate.replayed_sets
                                      else (replayed or {}).get(name))  # None: not known

    greedy_res = None
    if prompts:
        if _has_tokenizer(ckpt):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(ckpt))
            batches = encode_prompts(tok, prompts, cfg.chat_template)
            say(f"greedy answers: {len(batches)} prompts x {cfg.max_new_tokens} tokens, two models")
            tr_ans = greedy(model, batches, cfg.max_new_tokens)
            with pair.base() as b:
                ba_ans = greedy(b, batches, cfg.max_new_tokens)
            greedy_res = greedy_summary(prompts, tok, tr_ans, ba_ans, cfg.max_new_tokens,
                                        cfg.chat_template)
        else:
            say(f"{ckpt} has no tokenizer: greedy agreement skipped")

    lm_res = None
    if cfg.lm_eval.enabled:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt))
        say(f"lm-eval tasks {cfg.lm_eval.tasks}")
        lm_res = {"tasks": list(cfg.lm_eval.tasks), "trained": run_lm_eval(model, tok, cfg.lm_eval)}
        with pair.base() as b:
            lm_res["base"] = run_lm_eval(b, tok, cfg.lm_eval)

    battery_res = None
    if battery_docs:
        from transformers import AutoTokenizer

        from llamapro.eval.battery import compare_battery, run_battery

        tok = AutoTokenizer.from_pretrained(str(ckpt))
        bc = cfg.battery
        n = sum(len(d) for d in battery_docs.values())
        say(f"knowledge battery: {n} questions of {list(battery_docs)}, trained model")
        tr_b = run_battery(model, tok, battery_docs, bc.batch_size, say, bc.share_context)
        say("knowledge battery: base model")
        with pair.base() as b:
            ba_b = run_battery(b, tok, battery_docs, bc.batch_size, say, bc.share_context)
        battery_res = {"tasks": compare_battery(ba_b, tr_b), "limit": bc.limit,
                       "seconds": round(sum(r["seconds"] for r in (*tr_b.values(), *ba_b.values())), 1)}

    gate = check_gate(sets, greedy_res, cfg.gate, battery_res)
    rollback = None
    if cfg.check_rollback:
        say("rollback check: strip the inserted blocks and compare with the base fingerprint")
        rollback = _rollback_check(ckpt, meta, ckpt.parent)
    training = meta.get("training") or {}
    results = {
        "version": RESULTS_VERSION,
        "checkpoint": str(ckpt.resolve()),
        "kind": meta.get("kind"),
        "base": {**base_info, "recorded_path": (meta.get("base") or {}).get("path"),
                 "fingerprint": (meta.get("base") or {}).get("fingerprint")},
        "new_layer_indices": list(meta.get("new_layer_indices") or []),
        "originals_frozen": training.get("originals_frozen"),
        "sets": sets,
        "greedy": greedy_res,
        "lm_eval": lm_res,
        "battery": battery_res,
        "gate": gate,
        "rollback": rollback,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "num_threads": torch.get_num_threads(),
        "eval_seconds": None,
        "eval_peak_rss_bytes": _peak_rss(),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return results


def write_results(out_dir, results: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / RESULTS_FILE
    write_json_atomic(p, results, indent=2, ensure_ascii=False, allow_nan=False)
    return p


def read_results(run_or_eval_dir) -> dict | None:
    d = Path(run_or_eval_dir)
    for p in (d / RESULTS_FILE, d / "eval" / RESULTS_FILE):
        if p.is_file():
            return json.loads(p.read_text())
    return None


# --- the step, from a config ----------------------------------------------------------------------

def locate(run_or_checkpoint) -> tuple[Path | None, Path]:
    """(run dir or None, checkpoint dir) from a run directory (with model/) or a checkpoint."""
    p = Path(run_or_checkpoint)
    if (p / "model" / "config.json").is_file():
        return p, p / "model"
    if (p / "config.json").is_file():
        run = p.parent if (p.parent / "metrics.jsonl").is_file() else None
        return run, p
    raise CheckpointError(f"{p} is neither a run directory (with model/) nor a model directory "
                          "(with config.json)")


def heldout_sets(cfg, ckpt, heldout: dict | None = None, say=None) -> dict:
    """The held-out sets ``cfg.eval`` asks for: ``heldout`` (arrays) if given, else the data
    sources' held-out splits through Ray Data (a local Ray is started when none is running and
    RAY_ADDRESS is unset); at most eval.max_blocks blocks each."""
    say = say or (lambda m: None)
    ec: EvalConfig = cfg.eval
    if heldout is None:
        data = getattr(cfg, "data", None)
        available = [s.name for s in (data.sources if data else []) if s.eval_fraction > 0]
        names = ec.set_names(available)
        known = data.source_names() if data else []
        if [n for n in names if n not in known]:  # before starting Ray for nothing
            raise EvalError(f"held-out sets {[n for n in names if n not in known]} have no held-out "
                            f"data: give them as arrays (--heldout NAME=PATH) or configure data "
                            f"sources of those names (configured: {known or 'none'})")
        if names:
            say(f"held-out blocks of {names} through Ray Data")
            started = _ensure_ray()
            try:
                heldout = heldout_from_config(data, str(ckpt), names, ec.max_blocks)
            finally:
                if started:
                    import ray

                    ray.shutdown()
        else:
            heldout = {}
    else:
        heldout = {n: {k: np.asarray(v)[:ec.max_blocks] for k, v in b.items()} for n, b in heldout.items()}
    if ec.sets:
        unknown = [n for n in ec.sets if n not in heldout]
        if unknown:
            raise EvalError(f"eval.sets {unknown} have no held-out data (available: {sorted(heldout)})")
        heldout = {n: heldout[n] for n in ec.sets}
    return heldout


def run_eval(cfg, run_dir=None, checkpoint=None, heldout: dict | None = None,
             trust_remote_code: bool | None = None, say=None) -> dict:
    """The eval step of the pipeline: what ``llamapro eval`` and ``jobs/eval.py`` call.

    ``cfg`` is the config tree (sections run, model, data, eval). Held-out sets are ``heldout``
    if given, else the configured sets' held-out splits through Ray Data (a local Ray is started
    when none is running and RAY_ADDRESS is unset). Writes results.json and, unless
    ``eval.report`` is false, the report. Returns the results; ``results["gate"]["passed"]``
    decides the exit code.
    """
    say = say or (lambda m: None)
    ec: EvalConfig = cfg.eval
    target = checkpoint or run_dir or ec.checkpoint or cfg.run.run_dir()  # arguments beat the config
    run, ckpt = locate(target)
    if run_dir:
        run = Path(run_dir)
    home = run or ckpt.parent / f"{ckpt.name}-eval"  # a bare checkpoint: results beside it
    out_dir = Path(ec.output_dir) if ec.output_dir else home / "eval"
    heldout = heldout_sets(cfg, ckpt, heldout, say)
    prompts = load_prompts(ec.prompts, ec.max_prompts) if ec.prompts else None
    trc = cfg.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    results = evaluate_checkpoint(ckpt, heldout, prompts, ec, out_dir=out_dir,
                                  trust_remote_code=trc, say=say, replayed=replayed_sources(cfg))
    results["run_dir"] = str(run.resolve()) if run else None
    results["results_path"] = str((out_dir / RESULTS_FILE).resolve())
    if ec.report:
        from llamapro.report import build_report

        report_dir = home / "report"
        say(f"report -> {report_dir}")
        results["report"] = str(build_report(run or ckpt, results, out_dir=report_dir))
    write_results(out_dir, results)
    return results


def replayed_sources(cfg) -> dict[str, bool]:
    """Which data sources the training mixture replays: weight > 0 (trained on), weight 0 (held
    out entirely: a set of those measures forgetting)."""
    data = getattr(cfg, "data", None)
    return {s.name: s.weight > 0 for s in (data.sources if data else [])}


def _ensure_ray() -> bool:
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:  # spare logical CPUs so Ray Data's tokenizer actors can start (they never get a CPU that Train holds)
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return True


def format_results(r: dict) -> str:
    """A few lines for a terminal: per set base -> trained perplexity, greedy agreement, gate."""
    lines = [f"checkpoint  {r['checkpoint']}", f"base        {r['base']['why']}"]
    for name, s in r["sets"].items():
        role = s["role"] + ("" if s.get("replayed") is None else
                            ", replayed" if s["replayed"] else ", not replayed")
        lines.append(f"{name:<24} [{role}] ppl {s['base']['ppl']:.4g} -> {s['trained']['ppl']:.4g} "
                     f"({s['ppl_change']:+.2%}) over {s['tokens']} tokens")
    bat = r.get("battery")
    if bat:
        from llamapro.eval.battery import format_change

        for name, e in bat["tasks"].items():
            lines.append(f"battery     {format_change(name, e)}")
    g = r.get("greedy")
    if g:
        lines.append(f"greedy      {g['prompts']} prompts x {g['max_new_tokens']} tokens: exact match "
                     f"{g['exact_match']:.0%}, mean prefix agreement {g['prefix_agreement']:.0%}")
    rb = r.get("rollback")
    if rb and rb.get("applicable"):
        lines.append("rollback    `llamapro strip` gives back the base exactly" if rb["equals_base"]
                     else "rollback    `llamapro strip` gives the base's architecture, NOT its exact weights")
    if r.get("report"):
        lines.append(f"report      {r['report']}")
    lines.append(r["gate"]["summary"])
    return "\n".join(lines)
