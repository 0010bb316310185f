"""The evaluation of one checkpoint against its base (:func:`evaluate_checkpoint`) and the same from
a config (:func:`run_eval`), which ``llamapro eval`` reaches through the pipeline's eval step and
:func:`llamapro.report.evaluate_and_report`, and ``llamapro compare`` calls per run."""

from __future__ import annotations

import time
from pathlib import Path

from llamapro.artifacts import EvalResults, ExpansionMetadata, RunLayout, locate, read_metadata
from llamapro.config.eval import EvalConfig
from llamapro.errors import BatteryError, CheckpointError, EvalError
from llamapro.eval.base import BasePair, resolve_base, rollback_check
from llamapro.eval.battery import compare_battery, load_battery, run_battery
from llamapro.eval.gate import check_gate
from llamapro.eval.harness import require_lm_eval, run_lm_eval
from llamapro.eval.heldout import as_blocks, heldout_sets, load_prompts, replayed_sources
from llamapro.eval.metrics import compare_sets, encode_prompts, greedy, greedy_summary, heldout_loss
from llamapro.eval.models import load_model, peak_rss, torch_threads
from llamapro.eval.results import RESULTS_FILE, RESULTS_VERSION, write_results
from llamapro.loading import has_tokenizer, load_tokenizer


def evaluate_checkpoint(checkpoint, heldout: dict, prompts: list[dict] | None, cfg: EvalConfig,
                        out_dir=None, trust_remote_code: bool = False, say=None,
                        replayed: dict[str, bool] | None = None) -> EvalResults:
    """Evaluate ``checkpoint`` against its base; write ``out_dir/results.json`` if given.

    ``heldout`` maps a set name to ``{"input_ids", "labels"}`` arrays; ``prompts`` are records
    with a ``prompt`` (see :func:`load_prompts`). ``replayed`` says which sets were in the
    training mixture (eval.gate.replayed_sets overrides it). Returns the results (a dict).
    """
    say = say or (lambda m: None)
    t0 = time.perf_counter()
    ckpt = Path(checkpoint)
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: no config.json; give a trained model directory "
                              "(RUN/model) or a run directory")
    meta = read_metadata(ckpt) or ExpansionMetadata()
    heldout = {n: as_blocks(n, b["input_ids"], b.get("labels")) for n, b in (heldout or {}).items()}
    if cfg.lm_eval.enabled:
        require_lm_eval()  # fail before loading anything
    battery_docs = None
    if cfg.battery.enabled:
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


def _evaluate(ckpt: Path, meta: ExpansionMetadata, heldout: dict, prompts, cfg: EvalConfig, base_info: dict,
              trust_remote_code: bool, say, battery_docs: dict | None = None,
              replayed: dict | None = None) -> EvalResults:
    import torch

    say(f"loading {ckpt}")
    model = load_model(ckpt, cfg.dtype, trust_remote_code)
    base_model = None
    if base_info["mode"] == "path":
        say(f"loading base {base_info['path']}")
        base_model = load_model(base_info["path"], cfg.dtype, trust_remote_code)
    pair = BasePair(model, meta.new_layer_indices, base_model)
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
        if has_tokenizer(ckpt):
            tok = load_tokenizer(ckpt)
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
        tok = load_tokenizer(ckpt)
        say(f"lm-eval tasks {cfg.lm_eval.tasks}")
        lm_res = {"tasks": list(cfg.lm_eval.tasks), "trained": run_lm_eval(model, tok, cfg.lm_eval)}
        with pair.base() as b:
            lm_res["base"] = run_lm_eval(b, tok, cfg.lm_eval)

    battery_res = None
    if battery_docs:
        tok = load_tokenizer(ckpt)
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
        rollback = rollback_check(ckpt, meta, ckpt.parent)
    results = EvalResults({
        "version": RESULTS_VERSION,
        "checkpoint": str(ckpt.resolve()),
        "kind": meta.kind,
        "base": {**base_info, "recorded_path": meta.base_path, "fingerprint": meta.base_fingerprint},
        "new_layer_indices": list(meta.new_layer_indices),
        "originals_frozen": meta.training.originals_frozen if meta.training is not None else None,
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
        "eval_peak_rss_bytes": peak_rss(),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return results


# --- the step, from a config ----------------------------------------------------------------------

def eval_paths(cfg, run_dir=None, checkpoint=None) -> tuple[Path | None, Path, Path, Path]:
    """Where the eval step reads and writes: (run dir or None, checkpoint, home, results dir).
    ``home`` holds eval/ and report/: the run, or ``CKPT-eval`` beside a bare checkpoint."""
    ec: EvalConfig = cfg.eval
    target = checkpoint or run_dir or ec.checkpoint or cfg.run.run_dir()  # arguments beat the config
    run, ckpt = locate(target)
    if run_dir:
        run = Path(run_dir)
    home = run or ckpt.parent / f"{ckpt.name}-eval"  # a bare checkpoint: results beside it
    out_dir = Path(ec.output_dir) if ec.output_dir else RunLayout(home).eval
    return run, ckpt, home, out_dir


def run_eval(cfg, run_dir=None, checkpoint=None, heldout: dict | None = None,
             trust_remote_code: bool | None = None, say=None) -> EvalResults:
    """Evaluate the run (or checkpoint) a config names, without the report.

    ``cfg`` is the config tree (sections run, model, data, eval). Held-out sets are ``heldout``
    if given, else the configured sets' held-out splits through Ray Data (a local Ray is started
    when none is running and RAY_ADDRESS is unset). Writes results.json; the report is drawn a
    layer above (:func:`llamapro.report.evaluate_and_report`, what ``llamapro eval`` runs).
    Returns the results; ``results["gate"]["passed"]`` decides the exit code.
    """
    say = say or (lambda m: None)
    ec: EvalConfig = cfg.eval
    run, ckpt, _, out_dir = eval_paths(cfg, run_dir, checkpoint)
    heldout = heldout_sets(cfg, ckpt, heldout, say)
    prompts = load_prompts(ec.prompts, ec.max_prompts) if ec.prompts else None
    trc = cfg.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    results = evaluate_checkpoint(ckpt, heldout, prompts, ec, out_dir=out_dir,
                                  trust_remote_code=trc, say=say, replayed=replayed_sources(cfg))
    results["run_dir"] = str(run.resolve()) if run else None
    results["results_path"] = str((out_dir / RESULTS_FILE).resolve())
    write_results(out_dir, results)
    return results
