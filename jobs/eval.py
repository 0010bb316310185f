"""Evaluate a trained run against its base, apply the regression gate, write the report: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/eval.py --config jobs/configs/eval_demo.yaml eval.max_blocks=16

Reads run, model, data and eval; writes <run dir>/eval/results.json and <run dir>/report/ (when
run.output_dir is a URI, the trained model is downloaded first and both are uploaded after).
Exit codes: 0 ok, 2 bad input, 4 regression gate failed. `ray job submit` then exits 1, the job's
status message reads "failed with exit code 4" (JobInfo.driver_exit_code == 4) and the last log
line is the gate's sentence.
"""

import sys

from llamapro.cli import main as cli


def main(argv=None) -> int:
    return cli(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
