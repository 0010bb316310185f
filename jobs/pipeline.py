"""The whole pipeline (expand -> train -> eval/gate -> report -> export -> serve smoke) as one Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py --config jobs/configs/demo.yaml [--quick] [overrides ...]

Exit code 4 when the regression gate fails (the job is then FAILED with driver exit code 4).
"""

import sys

from llamapro.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
