"""Expand a base model and prove identity, as a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/expand.py --config jobs/configs/demo.yaml expand.blocks=8

Reads the `model` and `expand` sections; writes <run.output_dir>/<run.name>/expanded.
"""

import argparse
import sys

from llamapro import steps
from llamapro.config import load_config
from llamapro.demo import resolve_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. expand.blocks=4")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    meta = steps.expand(resolve_model(cfg.model.base), f"{cfg.run.run_dir()}/expanded",
                        blocks=cfg.expand.blocks, strategy=cfg.expand.strategy,
                        positions=cfg.expand.positions or None,
                        residual_writers=cfg.expand.residual_writers or None,
                        verify=cfg.expand.verify, force=True,
                        trust_remote_code=cfg.model.trust_remote_code, progress=False)
    print(steps.summary(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
