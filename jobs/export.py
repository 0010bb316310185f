"""Export a trained run as a clean standard HF directory with a model card: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/export.py --config jobs/configs/eval_demo.yaml export.force=true

Reads run, model and export; writes export.out (default <run dir>/export; either may be a URI such
as s3://bucket/runs/demo/export: written locally, then uploaded) atomically: an
interrupted job leaves the previous export intact, and an existing one is replaced only when
export.force is true. Exit codes: 0 ok, 2 bad input (e.g. the export exists and force is false).
"""

import argparse
import sys

from llamapro import storage
from llamapro.checkpoint import CheckpointError
from llamapro.config import ConfigError
from llamapro.cli.eval import EXIT_BAD_INPUT, load
from llamapro.publish.export import export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. export.max_shard_size=500MB")
    a = p.parse_args(argv)
    try:
        cfg = load(a.config, a.overrides)
        xc = cfg.export
        with storage.synced(cfg.run.run_dir(), pull=["model", "eval", "config.yaml"],
                            push=[] if xc.out else ["export"]) as run:
            out = storage.local_dir(xc.out) if xc.out else run / "export"
            res = export(run, out, force=xc.force, max_shard_size=xc.max_shard_size,
                         dtype=xc.dtype, trust_remote_code=cfg.model.trust_remote_code,
                         base_model=xc.base_model or None, license=xc.license or None,
                         say=lambda m: print(f"[export] {m}", flush=True))
            if storage.is_uri(xc.out):
                storage.upload(out, xc.out)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported -> {res['out']} ({res['num_layers']} layers, {len(res['shards'])} shard(s), "
          f"fingerprint {res['fingerprint']})")
    if res["gate"]:
        print(res["gate"]["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
