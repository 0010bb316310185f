"""Expand a base model and prove identity, as a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/expand.py --config jobs/configs/demo.yaml expand.blocks=8

Reads the `model` and `expand` sections; writes <run.output_dir>/<run.name>/expanded (uploaded there
when run.output_dir is a URI such as s3://bucket/runs; model.base may be one too).
"""

import sys

from llamapro.cli.jobs import job_main


def main(argv=None) -> int:
    return job_main("expand", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
