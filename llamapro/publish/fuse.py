"""``llamapro fuse RUN_OR_CHECKPOINT OUT``: a trained run as one standard model, with a fusion strength.

Two methods (``fusion_method`` in the LLaMA-Pro pipeline's terms):

- ``residual``: the inserted blocks stay as trained, in the residual stream beside the originals
  (the plain LLaMA-Pro result). LoRA adapters are merged; the output is one standard HF directory.
- ``weighted``: each inserted block becomes ``(1 - alpha) * identity_init + alpha * trained``, the
  identity initialisation being its source block with the residual writers zeroed (what
  ``llamapro expand`` wrote). alpha = 0 gives back the base exactly (the writers are exactly zero
  again, every other tensor equals the source's), alpha = 1 the trained model. In between, new-domain
  gain is traded against retention without retraining: weight-space interpolation in the spirit of
  WiSE-FT (Wortsman et al., 2022). ``alpha="auto"`` evaluates a small grid on the held-out
  new-domain and retention sets with the evaluation's machinery and takes the largest domain gain
  that passes the regression gate; the model card and the run's report show the curve.

The identity initialisation is rebuilt from the base (an explicit one, or the path recorded in
``llamapro.json`` whose fingerprint still matches), expanded in memory with the recorded placement.
Without a reachable base it is rebuilt from the trained checkpoint's own original layers, which are
bit-identical to the base when training kept them frozen; when they were trained and no base is
reachable, fusion is refused. With a base, every tensor that differs from it is interpolated (so
alpha = 0 is the exact base even if the originals were trained); with frozen originals that is
exactly the inserted blocks.

The output is written like :func:`llamapro.publish.export.export` (atomic, never over an existing OUT
without ``force``, adapters merged, model card with lineage and alpha); a refused or failed fusion
writes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from llamapro.artifacts import (
    ExpansionMetadata,
    RunLayout,
    locate,
    read_metadata,
    read_results,
    require_metadata,
    write_results,
)
from llamapro.config.eval import FUSE_METHODS, EvalConfig, parse_alpha
from llamapro.errors import CheckpointError, EvalError, FuseError, NoAlphaPassesGate  # noqa: F401
from llamapro.eval import (
    as_blocks,
    check_gate,
    compare_sets,
    encode_prompts,
    greedy,
    greedy_summary,
    heldout_loss,
    heldout_sets,
    load_prompts,
    torch_threads,
)
from llamapro.expansion.api import resolve_local
from llamapro.expansion.families import Family, family_for, num_layers_of, split_layer_key, writer_param_names
from llamapro.expansion.strategies import Placement
from llamapro.loading import has_tokenizer, load_model, load_tokenizer
from llamapro.publish.card import CURVE_PNG, fused_results, fusion_section
from llamapro.publish.source import adapter_base, check_destination, find_adapter, load_merged
from llamapro.publish.standard_dir import write_standard_dir
from llamapro.report import build_report, plot_alpha_curve
from llamapro.tensors import fingerprint, read_config

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


# --- what is being fused ------------------------------------------------------------------------

def source_metadata(ckpt: Path) -> tuple[ExpansionMetadata, Placement]:
    """The checkpoint's llamapro metadata and the placement of its inserted blocks; refuses
    anything that is not an expanded (and usually trained) checkpoint."""
    meta_dir = ckpt
    if read_metadata(ckpt) is None and not (ckpt / "config.json").is_file():
        adapter = find_adapter(ckpt)  # a pure adapter: the metadata lives with its base
        if adapter is not None:
            ref = adapter_base(adapter)
            if ref and Path(ref).is_dir():
                meta_dir = Path(ref)
    if read_metadata(meta_dir) is None:
        raise FuseError(f"{ckpt} has no llamapro.json: it is not an expanded checkpoint (made by "
                        "`llamapro expand`, then trained), so there are no inserted blocks to fuse. "
                        "A plain checkpoint needs no fusion; use `llamapro export`")
    meta = require_metadata(meta_dir)
    new = sorted(int(i) for i in meta.new_layer_indices)
    if not new:
        mode = meta.training.mode if meta.training else None
        raise FuseError(f"{ckpt} records no inserted layers" + (f" (a {mode} baseline)" if mode else "")
                        + ": fusion blends inserted blocks; use `llamapro export` for this checkpoint")
    try:
        placement = Placement(int(meta["num_original_layers"]), tuple(new), meta.get("strategy", "explicit"))
        recorded = {int(k): int(v) for k, v in meta["new_layer_sources"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise FuseError(f"{meta_dir}/llamapro.json lacks the placement of the new blocks ({e})") from None
    if recorded != placement.new_sources() or placement.num_total != meta.get("num_layers"):
        raise FuseError(f"{meta_dir}/llamapro.json is inconsistent: new layers {new} with sources "
                        f"{recorded} do not fit {meta.get('num_original_layers')} original layers")
    if (ckpt / "config.json").is_file() and num_layers_of(read_config(ckpt)) != placement.num_total:
        raise FuseError(f"{ckpt}: config has {num_layers_of(read_config(ckpt))} layers but the "
                        f"metadata records {placement.num_total}")
    return meta, placement


def originals_frozen(meta: dict) -> bool:
    """Whether training kept the original layers frozen (an untrained expansion: yes)."""
    training = ExpansionMetadata.of(meta).training or {}
    return bool(training.get("originals_frozen", meta.get("kind") == "expanded"))


def resolve_base_dir(meta: dict, explicit: str | None = None) -> tuple[Path | None, str]:
    """(base directory or None, where the identity initialisation comes from, in words).

    An explicit base must have the recorded fingerprint; the recorded path is used when it still
    does; otherwise the trained checkpoint's own originals, if they were frozen; else refused."""
    meta = ExpansionMetadata.of(meta)
    want = meta.base_fingerprint
    if explicit:
        d = resolve_local(explicit)
        fp = fingerprint(d)
        if want and fp != want:
            raise FuseError(f"base {explicit}: its fingerprint {fp} differs from that of the base this "
                            f"checkpoint was expanded from ({want}); the identity initialisation must "
                            "come from that exact base")
        return d, f"the base at {d} (fingerprint checked)"
    recorded = meta.base_path
    note = f"the recorded base {recorded!r} is not reachable"
    if recorded and Path(recorded).is_dir():
        try:
            same = fingerprint(Path(recorded)) == want
        except (CheckpointError, OSError, ValueError):
            same = False
        if same:
            return Path(recorded), f"the recorded base at {recorded} (fingerprint checked)"
        note = f"the recorded base {recorded} has changed since (its fingerprint differs)"
    if originals_frozen(meta):
        return None, ("the checkpoint's own original layers, frozen during training and so "
                      f"bit-identical to the base ({note})")
    raise FuseError(f"cannot rebuild the identity initialisation of the inserted blocks: {note}, and "
                    "the original layers were trained (training.originals_frozen is false), so the "
                    "checkpoint's own copies are not the base's. Pass the base model with --base "
                    "(fuse.base)")


def _family(meta: dict, model_type: str) -> Family:
    meta = ExpansionMetadata.of(meta)
    name = str(meta.family or "")
    if name.startswith("user:"):  # writers named by the user at expansion time
        return Family(name, (model_type,), tuple(meta.zeroed_in_new_blocks), ())
    return family_for(model_type)


def identity_reference(model, meta: dict, placement: Placement, base_model=None) -> dict:
    """Parameter name -> its identity initialisation, for ``model`` (the trained, expanded one).

    With ``base_model`` (the unexpanded base, loaded in the same dtype): the base expanded in memory
    with the recorded placement, every parameter. Without: only the inserted blocks' parameters,
    from the model's own original layers (valid when they were frozen)."""
    import torch

    from llamapro.expansion.surgery import expand_model, find_layers  # downward; local: surgery imports torch

    family = _family(meta, model.config.model_type)
    params = dict(model.named_parameters())
    if base_model is not None:
        ref = dict(expand_model(base_model, placement, family).model.named_parameters())
        bad = sorted(set(ref) ^ set(params)) or [n for n in params if ref[n].shape != params[n].shape]
        if bad:
            raise FuseError(f"the base, expanded with the recorded placement, does not have the "
                            f"trained checkpoint's parameters (first differences: {bad[:4]})")
        return ref
    path, layers = find_layers(model)
    o2e = placement.orig_to_expanded()
    ref = {}
    with torch.no_grad():
        for j, src in placement.new_sources().items():
            source = dict(layers[o2e[src]].named_parameters())
            zero = set(writer_param_names(source, family))
            for rest, t in source.items():
                name = f"{path}.{j}.{rest}"
                if name not in params or params[name].shape != t.shape:
                    raise FuseError(f"inserted block {j} does not have the structure of original "
                                    f"layer {src} it was copied from ({rest})")
                ref[name] = torch.zeros_like(t) if rest in zero else t
    return ref


class Blender:
    """Sets each parameter that differs from its identity initialisation to
    ``ref + alpha * (trained - ref)``; any alpha, any number of times (the trained values are kept)."""

    def __init__(self, model, ref: dict):
        import torch

        self.model, self.alpha, self.pairs = model, 1.0, []
        with torch.no_grad():
            for n, p in model.named_parameters():
                r = ref.get(n)
                if r is None or r is p or torch.equal(r, p):
                    continue  # identical: every alpha gives the same tensor
                self.pairs.append((n, p, r, p.detach().clone()))

    @property
    def names(self) -> list[str]:
        return [n for n, *_ in self.pairs]

    def set(self, alpha: float) -> None:
        import torch

        with torch.no_grad():
            for _, p, r, t in self.pairs:
                if alpha == 0.0:  # exact endpoints: the identity init / the trained tensor, bit for bit
                    p.copy_(r)
                elif alpha == 1.0:
                    p.copy_(t)
                else:
                    p.copy_(torch.lerp(r.float(), t.float(), float(alpha)).to(p.dtype))
        self.alpha = float(alpha)


# --- alpha = auto ---------------------------------------------------------------------------------

def check_auto_gate(ec: EvalConfig, heldout: dict | None = None) -> None:
    """alpha=auto chooses by the regression gate: it needs one enabled, a new-domain set to measure
    the gain on, something to protect, and held-out data for every gated set."""
    g = ec.gate
    if not g.enabled:
        raise FuseError("alpha=auto chooses by the regression gate, but eval.gate.enabled is false")
    if not g.domain_sets:
        raise FuseError("alpha=auto needs a new-domain held-out set to measure the gain on: set "
                        "eval.gate.domain_sets (--domain NAME)")
    if not g.retention_sets and g.min_greedy_exact_match <= 0 and g.min_greedy_prefix_agreement <= 0:
        raise FuseError("alpha=auto needs something the gate protects: eval.gate.retention_sets "
                        "(--retention NAME) or a greedy-agreement threshold")
    if heldout is not None:
        missing = [s for s in g.gated_sets() if s not in heldout]
        if missing:
            raise FuseError(f"alpha=auto: the gate's sets {missing} have no held-out data (available: "
                            f"{sorted(heldout) or 'none'}; pass --heldout NAME=PATH or configure "
                            "data sources)")


def alpha_curve(blender: Blender, heldout: dict, ec: EvalConfig, alphas, greedy_inputs=None,
                say=None) -> list[dict]:
    """Held-out loss/perplexity (and greedy agreement when the gate needs it) at each alpha of the
    grid plus 0, each compared with alpha = 0 (the base) and put through the gate."""
    say = say or (lambda m: None)
    roles = {**{s: "retention" for s in ec.gate.retention_sets}, **{s: "domain" for s in ec.gate.domain_sets}}
    base_loss, base_ans, points = {}, None, []
    for a in sorted({0.0, *(float(x) for x in alphas)}):
        blender.set(a)
        loss = {n: heldout_loss(blender.model, b, ec.batch_size) for n, b in heldout.items()}
        base_loss = base_loss or loss
        sets = {n: compare_sets(roles.get(n, "other"), base_loss[n], loss[n]) for n in heldout}
        g_res = None
        if greedy_inputs is not None:
            prompts, tok, batches = greedy_inputs
            ans = greedy(blender.model, batches, ec.max_new_tokens)
            base_ans = base_ans or ans
            g_res = greedy_summary(prompts, tok, ans, base_ans, ec.max_new_tokens, ec.chat_template)
            g_res.pop("items")
        gate = check_gate(sets, g_res, ec.gate)
        gain = sum(-sets[n]["ppl_change"] for n in ec.gate.domain_sets) / len(ec.gate.domain_sets)
        points.append({"alpha": a, "sets": sets, "greedy": g_res, "gate": gate, "domain_gain": gain})
        say(f"alpha {a:g}: " + ", ".join(f"{n} ppl {s['trained']['ppl']:.4g} ({s['ppl_change']:+.2%})"
                                          for n, s in sets.items())
            + f"; gate {'passed' if gate['passed'] else 'FAILED'}")
    return points


def choose_alpha(curve: list[dict]) -> dict:
    """The point with the largest domain gain among those that pass the gate (a tie goes to the
    smaller alpha: closer to the base). Raises :class:`NoAlphaPassesGate` if none passes."""
    passing = [p for p in curve if p["gate"]["passed"]]
    if not passing:
        nearest = min(curve, key=lambda p: (sum(not c["passed"] for c in p["gate"]["checks"]), p["alpha"]))
        raise NoAlphaPassesGate(
            f"alpha=auto: none of the alphas {[p['alpha'] for p in curve]} passes the regression gate; "
            f"nothing was written. At alpha {nearest['alpha']:g}: {nearest['gate']['summary']}", curve)
    return max(passing, key=lambda p: (p["domain_gain"], -p["alpha"]))


def _greedy_inputs(ckpt: Path, ec: EvalConfig, prompts):
    if not prompts or (ec.gate.min_greedy_exact_match <= 0 and ec.gate.min_greedy_prefix_agreement <= 0):
        return None  # the gate does not look at greedy answers: don't spend on them
    if not has_tokenizer(ckpt):
        raise EvalError(f"{ckpt} has no tokenizer: the gate's greedy thresholds cannot be checked")
    tok = load_tokenizer(ckpt)
    return prompts, tok, encode_prompts(tok, prompts, ec.chat_template)


# --- the step -------------------------------------------------------------------------------------

def fuse(src, out, method: str = "residual", alpha=None, *, alphas=DEFAULT_ALPHAS, base: str | None = None,
         heldout: dict | None = None, eval_cfg: EvalConfig | None = None, prompts=None,
         force: bool = False, max_shard_size: str = "2GB", dtype: str = "auto",
         trust_remote_code: bool = False, base_model: str | None = None, license: str | None = None,
         report: bool = True, say=None) -> dict:
    """Fuse a run (RUN/model) or checkpoint into ``out``; returns the export metadata with
    ``fusion`` (method, alpha, identity source, and for alpha="auto" the curve and the choice).

    ``alpha`` (weighted only): a float in [0, 1] or "auto"; "auto" needs ``heldout``
    (``{name: {"input_ids", "labels"}}``) covering ``eval_cfg.gate``'s sets."""
    say = say or (lambda m: None)
    if method not in FUSE_METHODS:
        raise FuseError(f"fusion method {method!r} is not one of {', '.join(FUSE_METHODS)}")
    if method == "residual":
        if alpha is not None and alpha != 1.0:
            raise FuseError("alpha applies to --method weighted; residual keeps the trained blocks (alpha 1)")
        alpha = 1.0
    elif alpha is None:
        raise FuseError("--method weighted needs --alpha: a number in [0, 1] or auto")
    alpha = parse_alpha(alpha, "alpha")
    grid = sorted({0.0, *(parse_alpha(a, "alphas") for a in alphas)}) if alpha == "auto" else None
    _check_src(src)
    run, ckpt, out = check_destination(src, out, force)
    meta, placement = source_metadata(ckpt)
    ec = eval_cfg or EvalConfig()
    if alpha == "auto":
        heldout = {n: as_blocks(n, b["input_ids"], b.get("labels")) for n, b in (heldout or {}).items()}
        check_auto_gate(ec, heldout)
    base_dir, identity_from = (None, "not needed (residual)")
    if method == "weighted":
        base_dir, identity_from = resolve_base_dir(meta, base)

    say(f"loading {ckpt}")
    model, info = load_merged(ckpt, dtype, trust_remote_code, say)
    fusion = {"method": method, "alpha": 1.0, "alpha_requested": alpha, "identity_from": identity_from,
              "base": str(base_dir) if base_dir else None, "interpolated_tensors": 0,
              "interpolated_params": 0, "originals_interpolated": False, "grid": grid, "curve": None,
              "choice": None, "fused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    chosen = None
    if method == "weighted":
        base_m = None
        if base_dir is not None:
            say(f"loading base {base_dir} to rebuild the identity initialisation")
            base_m = load_model(base_dir, dtype=next(model.parameters()).dtype,
                                trust_remote_code=trust_remote_code)
        blender = Blender(model, identity_reference(model, meta, placement, base_m))
        del base_m  # the blender keeps only the tensors that differ
        new = set(placement.new_indices)
        fusion.update(interpolated_tensors=len(blender.pairs),
                      interpolated_params=sum(p.numel() for _, p, _, _ in blender.pairs),
                      originals_interpolated=any((split_layer_key(n) or ("", -1))[1] not in new
                                                 for n in blender.names))
        if alpha == "auto":
            with torch_threads(ec.num_threads):
                curve = alpha_curve(blender, heldout, ec, grid, _greedy_inputs(ckpt, ec, prompts), say)
            chosen = choose_alpha(curve)
            alpha = chosen["alpha"]
            dom = ", ".join(f"{n} {chosen['sets'][n]['ppl_change']:+.2%}" for n in ec.gate.domain_sets)
            fusion.update(curve=curve, choice=(
                f"alpha = auto: of the alphas {grid} evaluated on the held-out sets, alpha = {alpha:g} "
                f"has the largest new-domain gain (perplexity {dom}) that passes the regression gate."))
        blender.set(alpha)
        fusion["alpha"] = alpha

    run_results = read_results(run) if run is not None else None
    scratch = Path(tempfile.mkdtemp(prefix="llamapro-fuse-"))
    try:
        png = scratch / CURVE_PNG
        has_png = bool(fusion["curve"]) and plot_alpha_curve(fusion, png)
        say(f"writing the fused model ({method}, alpha {alpha:g}) to {out}")
        res = write_standard_dir(
            model, out, ckpt, run, meta, info, fused_results(fusion, run_results, chosen), force=force,
            max_shard_size=max_shard_size, dtype=dtype, base_model=base_model, license=license, say=say,
            kind="fused", extra_meta={"fusion": fusion}, card_sections=fusion_section(fusion, has_png),
            extra_files={CURVE_PNG: png} if has_png else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["fusion"] = fusion
    if run is not None and report:
        write_results(RunLayout(run).fusion, {**fusion, "out": str(Path(out).resolve()), "source": str(ckpt.resolve())})
        res["report"] = str(build_report(run))
        say(f"report -> {res['report']}")
    return res


def _check_src(src) -> None:
    p = Path(src)
    if not p.exists():
        raise FuseError(f"{p} does not exist: give a run directory (with model/) or a checkpoint")
    if (p / "metrics.jsonl").is_file() and not (p / "model").exists():
        raise FuseError(f"{p} is a run whose training has not finished (no model/): rerun the training "
                        "with the same run name to resume it, then fuse")


def run_fuse(cfg, source=None, out=None, heldout: dict | None = None, force: bool = False,
             alpha_given: bool = False, trust_remote_code: bool | None = None, say=None) -> dict:
    """The fuse step from the config tree (sections run, model, data, eval, export, fuse): what
    ``llamapro fuse``, ``jobs/fuse.py`` and ``llamapro run`` call. For alpha=auto the held-out sets
    are ``heldout`` (arrays) or the data sources' held-out splits through Ray Data."""
    say = say or (lambda m: None)
    fc, xc, ec = cfg.fuse, cfg.export, cfg.eval
    alpha = parse_alpha(fc.alpha) if fc.method == "weighted" else None
    if fc.method == "residual" and alpha_given:
        raise FuseError("--alpha applies to --method weighted; residual keeps the trained blocks as they are")
    src = Path(source or cfg.run.run_dir())
    _check_src(src)
    if out is None and not fc.out:
        run, ckpt = locate(src, adapters=True)
        out = RunLayout(run or ckpt.parent).fused
    force = force or fc.force
    run, ckpt, out = check_destination(src, out or fc.out, force)  # refuse early, before any work
    source_metadata(ckpt)
    prompts = None
    if alpha == "auto":
        check_auto_gate(ec)
        heldout = heldout_sets(cfg, ckpt, heldout, say)
        check_auto_gate(ec, heldout)
        prompts = load_prompts(ec.prompts, ec.max_prompts) if ec.prompts else None
    trc = cfg.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    return fuse(src, out, fc.method, alpha, alphas=fc.alphas, base=fc.base or None, heldout=heldout,
                eval_cfg=ec, prompts=prompts, force=force, max_shard_size=xc.max_shard_size,
                dtype=xc.dtype, trust_remote_code=trc, base_model=xc.base_model or None,
                license=xc.license or None, report=fc.report, say=say)


def format_fusion(res: dict) -> str:
    """A few lines for a terminal."""
    f = res["fusion"]
    lines = [f"fused -> {res['out']} ({f['method']}, alpha {f['alpha']:g}, {res['num_layers']} layers, "
             f"{len(res['shards'])} shard(s), fingerprint {res['fingerprint']})"]
    if f["method"] == "weighted":
        lines.append(f"identity initialisation: {f['identity_from']}; {f['interpolated_tensors']} tensors "
                     "interpolated")
    for p in f.get("curve") or []:
        lines.append(f"alpha {p['alpha']:<5g} " + "  ".join(
            f"{n} ppl {s['trained']['ppl']:.4g} ({s['ppl_change']:+.2%})" for n, s in p["sets"].items())
            + f"  gate {'passed' if p['gate']['passed'] else 'FAILED'}")
    if f.get("choice"):
        lines.append(f["choice"])
    if res.get("merged_adapter"):
        lines.append(f"merged adapter {res['merged_adapter']}")
    if res.get("report"):
        lines.append(f"report      {res['report']}")
    if res.get("stale_partial_exports"):
        lines.append(f"note: partial outputs left by interrupted runs (safe to delete): "
                     f"{', '.join(res['stale_partial_exports'])}")
    return "\n".join(lines)
