"""Deploy (or update in place) the OpenAI-compatible Serve app of a config: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/serve.py --config jobs/configs/serve_cluster.yaml serve.canary.weights.expanded=0.5

Deploys declaratively (what `serve deploy` and KubeRay's serveConfigV2 do), waits until every
deployment is healthy, asks one chat question (--no-smoke skips it) and exits; the app keeps
serving after the job ends. Rerunning with other canary weights, limits or autoscaling updates the
live replicas in place (traffic keeps flowing); `--delete` removes the app. The replicas run this
job's working_dir, so they import the same llamapro code. Model paths must be readable on every
node (shared storage, e.g. /mnt/runs/demo/export). Exit codes: 0 ok, 1 deploy failed, 2 bad input.
"""

import argparse
import os
import sys

from llamapro.cli.exits import report
from llamapro.errors import EXIT_ERROR, EXIT_OK, LlamaproError
from llamapro.runtime import ensure_ray
from llamapro.serve import absolutize_paths, deploy, describe, job_runtime_env, load_serve_config, smoke_chat


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config with a serve: section")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.port=8001")
    p.add_argument("--no-smoke", action="store_true", help="skip the test chat request")
    p.add_argument("--delete", action="store_true", help="remove the app and exit")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for healthy replicas")
    a = p.parse_args(argv)
    try:
        cfg = absolutize_paths(load_serve_config(a.config, a.overrides))
    except LlamaproError as e:  # a bad config: exit 2
        return report(e)

    from ray import serve

    ensure_ray("serve", address=os.environ.get("RAY_ADDRESS") or "auto")  # the job's cluster
    if a.delete:
        serve.delete(cfg.app_name)
        print(f"deleted Serve app {cfg.app_name!r}")
        return EXIT_OK
    try:
        deploy(cfg, runtime_env=job_runtime_env(cfg), wait_s=a.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(describe(cfg), flush=True)
    if not a.no_smoke:
        r = smoke_chat(cfg)
        print(f"smoke: {r['model']} answered {r['answer']!r}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
