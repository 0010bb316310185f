"""Fuse a trained run into one standard HF model with a tunable fusion strength: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/fuse.py --config jobs/configs/eval_demo.yaml fuse.method=weighted fuse.alpha=auto

Reads run, model, data, eval, export and fuse; writes fuse.out (default <run dir>/fused) atomically,
and the alpha curve into <run dir>/fusion/results.json and <run dir>/report/ (a URI run dir or
fuse.out is worked on locally, then uploaded). alpha=auto evaluates fuse.alphas on the held-out
splits of eval.gate's sets (through Ray Data).
Exit codes: 0 ok, 2 bad input, 4 alpha=auto found no alpha that passes the regression gate.
"""

import argparse
import sys

from llamapro import storage
from llamapro.checkpoint import CheckpointError
from llamapro.config import ConfigError
from llamapro.cli.eval import EXIT_BAD_INPUT, load
from llamapro.config.eval import EXIT_GATE_FAILED
from llamapro.eval import EvalError
from llamapro.expand.families import UnsupportedModelError
from llamapro.publish.fuse import NoAlphaPassesGate, format_fusion, run_fuse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fuse.alpha=0.5")
    a = p.parse_args(argv)
    try:
        cfg = load(a.config, a.overrides)
        fc = cfg.fuse
        with storage.synced(cfg.run.run_dir(), pull=["model", "eval", "metrics.jsonl", "config.yaml"],
                            push=["fusion", "report"] + ([] if fc.out else ["fused"])) as run:
            out = storage.local_dir(fc.out) if fc.out else run / "fused"
            res = run_fuse(cfg, run, out, say=lambda m: print(f"[fuse] {m}", flush=True))
            if storage.is_uri(fc.out):
                storage.upload(out, fc.out)
    except (ConfigError, CheckpointError, EvalError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NoAlphaPassesGate as e:
        print(str(e), file=sys.stderr, flush=True)
        return EXIT_GATE_FAILED
    print(format_fusion(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
