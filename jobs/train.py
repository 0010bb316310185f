"""Train the inserted blocks (or a baseline) as a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --config jobs/configs/demo.yaml train.zero_stage=3

Reads model, expand, data and train; writes <run.output_dir>/<run.name>/{model,metrics.jsonl,ray}.
Expands first when the run has no expanded checkpoint yet.
"""

import sys

from llamapro.cli import main as cli


def main(argv=None) -> int:
    return cli(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
