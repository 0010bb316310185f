"""Expand a base model and prove identity, as a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/expand.py --config jobs/configs/demo.yaml expand.blocks=8

Reads the `model` and `expand` sections; writes <run.output_dir>/<run.name>/expanded (uploaded there
when run.output_dir is a URI such as s3://bucket/runs; model.base may be one too).
"""

import argparse
import sys

from llamapro.expand import api as steps
from llamapro.config import load_config
from llamapro.pipeline import expand_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. expand.blocks=4")
    a = p.parse_args(argv)
    meta = expand_step(load_config(a.config, a.overrides), force=True, progress=False)
    print(steps.summary(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
