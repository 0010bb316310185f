"""Search insertion positions, block counts, stage ratios and LR with Ray Tune, as a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/tune.py --config jobs/configs/tune_demo.yaml tune.num_samples=2

Each trial expands the base itself, trains with Ray Train + DeepSpeed and is ASHA-stopped when its
objective (new-domain gain minus a forgetting penalty) trails. Writes
<run.output_dir>/<tune name>/{results.csv,results.md,pareto.png,best.yaml,trials/}. Submitting the
same command again resumes an interrupted experiment; --force starts it over. The cluster must
declare the trial-driver resource (tune.driver_resource, default llamapro_tune_driver) on a node.
"""

import argparse
import sys

from llamapro.config import ConfigError, load_config
from llamapro.tune import format_summary, run_tune


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--force", action="store_true", help="start over instead of resuming")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=2")
    a = p.parse_args(argv)
    try:
        s = run_tune(load_config(a.config, a.overrides), force=a.force)
    except ConfigError as e:  # a bad space fails before any trial, with one sentence
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(s))
    return 0 if s.get("best") and not s["status"].get("unfinished") else 1


if __name__ == "__main__":
    sys.exit(main())
