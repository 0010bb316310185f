"""Train the inserted blocks (or a baseline) as a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --config jobs/configs/demo.yaml train.zero_stage=3

Reads model, expand, data and train; writes <run.output_dir>/<run.name>/{model,metrics.jsonl,ray}.
Expands first when the run has no expanded checkpoint yet.
"""

import argparse
import sys

from llamapro.config import load_config
from llamapro.pipeline import train_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_stages=2")
    a = p.parse_args(argv)
    res = train_step(load_config(a.config, a.overrides))
    print(f"trained model: {res['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
