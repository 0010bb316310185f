"""Fuse a trained run into one standard HF model with a tunable fusion strength: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/fuse.py --config jobs/configs/eval_demo.yaml fuse.method=weighted fuse.alpha=auto

Reads run, model, data, eval, export and fuse; writes fuse.out (default <run dir>/fused) atomically,
and the alpha curve into <run dir>/fusion/results.json and <run dir>/report/ (a URI run dir or
fuse.out is worked on locally, then uploaded). alpha=auto evaluates fuse.alphas on the held-out
splits of eval.gate's sets (through Ray Data).
Exit codes: 0 ok, 2 bad input, 4 alpha=auto found no alpha that passes the regression gate.
"""

import sys

from llamapro.cli.jobs import job_main


def main(argv=None) -> int:
    return job_main("fuse", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
