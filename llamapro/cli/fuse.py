"""`llamapro fuse`: a trained run as one standard HF model, with a fusion strength alpha."""

from __future__ import annotations

import json
import sys

from llamapro.cli.eval import add_heldout_args, heldout_overrides
from llamapro.cli.exits import guarded
from llamapro.errors import EXIT_OK


@guarded
def cmd_fuse(a) -> int:
    """0 fused; 2 bad input; 4 --alpha auto: no alpha of the grid passes the regression gate.
    SOURCE and OUT may be URIs (a run behind a URI is downloaded, its fusion/ and report/ uploaded)."""
    from llamapro.config import load_config
    from llamapro.eval import load_heldout_file
    from llamapro.pipeline import fuse_step
    from llamapro.publish.fuse import format_fusion

    ov = list(a.overrides) + heldout_overrides(a) + [
        f"{k}={v}" for k, v in (("fuse.method", a.method), ("fuse.alpha", a.alpha), ("fuse.alphas", a.alphas),
                                ("fuse.base", a.base), ("export.max_shard_size", a.max_shard_size),
                                ("export.dtype", a.dtype), ("export.base_model", a.base_model)) if v is not None]
    say = (lambda m: None) if a.quiet else (lambda m: print(f"[fuse] {m}", file=sys.stderr, flush=True))
    cfg = load_config(a.config, ov)
    heldout = {n: load_heldout_file(n, p) for n, p in a.heldout} or None
    res = fuse_step(cfg, a.source, a.out, heldout=heldout, force=a.force, alpha_given=a.alpha is not None,
                    trust_remote_code=a.trust_remote_code or None, say=say)  # NoAlphaPassesGate: exit 4
    print(json.dumps(res, indent=2) if a.json else format_fusion(res), flush=True)
    return EXIT_OK


def add_fuse_command(subparsers) -> None:
    """Register fuse on an argparse subparsers object."""
    f = subparsers.add_parser("fuse", help="a trained run as one standard HF model, with a fusion strength alpha",
                       description="residual: the trained blocks as they are (adapters merged). weighted: "
                       "each inserted block = (1 - alpha) x identity init + alpha x trained; alpha 0 is the "
                       "base, 1 the trained model; auto picks the largest new-domain gain that passes the "
                       "regression gate on the held-out sets. Written atomically like `export`.")
    f.add_argument("source", metavar="RUN_OR_CHECKPOINT")
    f.add_argument("out", metavar="OUT")
    f.add_argument("--method", choices=["residual", "weighted"], default=None, help="default: fuse.method")
    f.add_argument("--alpha", default=None, help="weighted: a number in [0, 1], or auto")
    f.add_argument("--alphas", default=None, help="the grid --alpha auto evaluates, e.g. 0,0.25,0.5,0.75,1")
    f.add_argument("--base", default=None, help="base to rebuild the identity init from "
                   "(default: the recorded base, else the frozen originals)")
    f.add_argument("--config", default=None, help="YAML config (sections data, eval, export, fuse)")
    f.add_argument("overrides", nargs="*", help="dotted overrides, right after OUT, e.g. eval.max_blocks=8")
    add_heldout_args(f)
    f.add_argument("--force", action="store_true", help="replace OUT if it exists")
    f.add_argument("--max-shard-size", default=None, help="largest safetensors shard, e.g. 500MB")
    f.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    f.add_argument("--base-model", default=None, help="hub id for the model card's base_model")
    f.add_argument("--trust-remote-code", action="store_true")
    f.add_argument("--json", action="store_true")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(fn=cmd_fuse)
