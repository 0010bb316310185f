"""Export a trained run as a clean standard HF directory with a model card: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/export.py --config jobs/configs/eval_demo.yaml export.force=true

Reads run, model and export; writes export.out (default <run dir>/export; either may be a URI such
as s3://bucket/runs/demo/export: written locally, then uploaded) atomically: an
interrupted job leaves the previous export intact, and an existing one is replaced only when
export.force is true. Exit codes: 0 ok, 2 bad input (e.g. the export exists and force is false).
"""

import sys

from llamapro.cli.jobs import job_main


def main(argv=None) -> int:
    return job_main("export", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
