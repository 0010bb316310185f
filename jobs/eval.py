"""Evaluate a trained run against its base, apply the regression gate, write the report: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/eval.py --config jobs/configs/eval_demo.yaml eval.max_blocks=16

Reads run, model, data and eval; writes <run dir>/eval/results.json and <run dir>/report/ (when
run.output_dir is a URI, the trained model is downloaded first and both are uploaded after).
Exit codes: 0 ok, 2 bad input, 4 regression gate failed. `ray job submit` then exits 1, the job's
status message reads "failed with exit code 4" (JobInfo.driver_exit_code == 4) and the last log
line is the gate's sentence.
"""

import argparse
import sys

from llamapro import storage
from llamapro.checkpoint import CheckpointError
from llamapro.config import ConfigError
from llamapro.cli.eval import EXIT_BAD_INPUT, load
from llamapro.config.eval import EXIT_GATE_FAILED
from llamapro.eval import EvalError, format_results, run_eval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_blocks=16")
    a = p.parse_args(argv)
    try:
        cfg = load(a.config, a.overrides)
        remote = storage.is_uri(cfg.run.run_dir())
        with storage.synced(cfg.run.run_dir(), pull=["model", "metrics.jsonl", "config.yaml"],
                            push=["eval", "report"]) as run:
            res = run_eval(cfg, run_dir=str(run) if remote else None,
                           say=lambda m: print(f"[eval] {m}", flush=True))
    except (EvalError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_results(res), flush=True)
    if not res["gate"]["passed"]:
        print(res["gate"]["summary"], file=sys.stderr, flush=True)
        return EXIT_GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
