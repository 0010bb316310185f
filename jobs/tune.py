"""Search insertion positions, block counts, stage ratios and LR with Ray Tune, as a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/tune.py --config jobs/configs/tune_demo.yaml tune.num_samples=2

Each trial expands the base itself, trains with Ray Train + DeepSpeed and is ASHA-stopped when its
objective (new-domain gain minus a forgetting penalty) trails. Writes
<run.output_dir>/<tune name>/{results.csv,results.md,pareto.png,best.yaml,trials/}. Submitting the
same command again resumes an interrupted experiment; --force starts it over. The cluster must
declare the trial-driver resource (tune.driver_resource, default llamapro_tune_driver) on a node.
"""

import sys

from llamapro.cli import main as cli


def main(argv=None) -> int:
    return cli(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
