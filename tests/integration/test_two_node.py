"""A tiny training job across a real two-node Ray cluster on this machine (a `ray start --head`
plus a `ray start --address` node, token auth on): one Train worker on each node, checkpoints on
shared storage (a ``file://`` URI, handled exactly like ``s3://``), the worker node killed mid-run,
a fresh node added, and the run resuming from its last checkpoint.

No file system is shared either: each node has its own llamapro cache (``LLAMAPRO_CACHE``), so a
worker finds the expanded model only by downloading it from the run's URI into its node's cache,
and rank 0's metrics and final model reach the driver only through the URI.

Placement: a Train worker takes 2 logical CPUs; the head has 3 and each worker node 2, so the
placement group can only put one worker per node. Ray Data cannot restart an actor lost with its
node (its constructor arguments are gone, ray-project/ray#53713), so the tokenizer actor is kept
on the head the way a user keeps it off preemptible nodes: ``data.actor_resources: {data: 1}``
and only the head advertises a ``data`` resource. The pipeline's bookkeeping actor is pinned to
the driver's node by the product itself. The job survives losing the node that holds a Train
worker, and the test checks where every tokenizer and bookkeeping actor ran.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import yaml

from llamapro import storage
from tests.integration.ray_cli_cluster import ROOT, LocalCluster
from tests.unit.eval_support import make_base

pytestmark = pytest.mark.integration

HEAD_CPUS, NODE_CPUS, WORKER_CPUS = 3, 2, 2
MAX_STEPS, EVERY = 12, 4
WORDS = "apt dpkg systemd journal unit socket mount cgroup namespace kernel module udev".split()


def _registered_steps(ray_storage: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (persisted in its snapshot)."""
    try:
        d = json.loads((ray_storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["metrics"]["step"] for r in d.get("checkpoint_results", [])]


def _node_copy(cache: Path, uri: str) -> Path:
    """Where a node whose LLAMAPRO_CACHE is ``cache`` keeps its copy of ``uri``."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LLAMAPRO_CACHE", str(cache))
        return storage.local_dir(uri)


def _worker_pids(runs: list[Path]) -> dict[int, int]:
    """Each worker writes its pid into its own node's copy of the run directory."""
    out = {}
    for rank in (0, 1):
        for run in runs:
            try:
                pid = int((run / f"worker-{rank}.pid").read_text())
            except (FileNotFoundError, ValueError):
                continue
            if psutil.pid_exists(pid) or rank not in out:
                out[rank] = pid
    return out


def _actor_list(cluster) -> list[dict]:
    return cluster.api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]


def _actors(cluster) -> str:
    """Where each live or dead actor is (class, node, state): the first thing to read when a
    node loss was not survived."""
    try:
        res = _actor_list(cluster)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"(actors unavailable: {e})"
    return "\n".join(f"{a.get('class_name')} node={a.get('node_id', '')[:8]} pid={a.get('pid')} "
                     f"state={a.get('state')}" for a in res)


def _placement(cluster, pids: dict[int, int]) -> list[int]:
    """The index of the node hosting each worker (sorted by rank); -1 when none does."""
    return [next((i for i, n in enumerate(cluster.nodes) if n.hosts(pid)), -1)
            for _, pid in sorted(pids.items())]


@pytest.fixture
def work(tmp_path, monkeypatch):
    base = make_base(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)]
                                                           for j in range(60))}) + "\n"
                              for i in range(160)))
    shared = tmp_path / "shared"  # every node's view of the same storage
    cfg = {
        "run": {"name": "tn", "output_dir": f"file://{shared}/runs"},
        "model": {"base": str(base)},
        "expand": {"blocks": 2, "verify": False},  # training then needs train.allow_unproven
        "data": {"seq_len": 32, "actors": 1, "actor_resources": {"data": 1}, "sources": [
            {"name": "domain", "paths": [str(corpus)], "eval_fraction": 0.1}]},
        "train": {"allow_unproven": True, "max_steps": MAX_STEPS, "checkpoint_every": EVERY, "eval_every": 100,
                  "eval_batches": 1, "micro_batch_size": 2, "lr": 1e-3, "num_workers": 2,
                  "cpus_per_worker": WORKER_CPUS, "zero_stage": 2,
                  # 3, not 1: the restarted group may start before the cluster has noticed the
                  # node is dead, and a Train worker placed there dies too (a second failure)
                  "max_failures": 3},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMAPRO_CACHE", str(cache))  # where the job's local copy of the run is
    return {"config": str(path), "uri": cfg["run"]["output_dir"] + "/tn", "cache": cache,
            "shared_run": shared / "runs" / "tn"}


def test_training_resumes_after_losing_a_node(work):
    caches = [work["cache"], work["cache"].with_name("cache-node1"), work["cache"].with_name("cache-node2")]
    runs = [_node_copy(c, work["uri"]) for c in caches]
    # the GCS declares a silent node dead after ~1 s instead of ~30 s: otherwise the restarted
    # worker group can still be placed on the killed node and fail again
    fast_health = {"RAY_health_check_period_ms": "250", "RAY_health_check_failure_threshold": "4",
                   "RAY_health_check_timeout_ms": "250"}
    with LocalCluster(num_cpus=HEAD_CPUS, resources={"data": 2},
                      env={"LLAMAPRO_CACHE": str(caches[0]), **fast_health}) as cluster:
        worker_node = cluster.add_node(num_cpus=NODE_CPUS, env={"LLAMAPRO_CACHE": str(caches[1])})
        client = cluster.job_client()
        job = client.submit_job(entrypoint=f"python jobs/train.py --config {work['config']}",
                                runtime_env={"working_dir": str(ROOT), **yaml.safe_load(
                                    (ROOT / "cluster/runtime_env.yaml").read_text())})
        ckpts = work["shared_run"] / "ray" / "tn-llamapro"  # Ray Train writes to the URI itself
        deadline = time.monotonic() + 480  # generous: a busy 2-core machine starts workers slowly
        while time.monotonic() < deadline:
            reg, pids = _registered_steps(ckpts), _worker_pids(runs)
            if reg and len(pids) == 2:
                break
            assert str(client.get_job_status(job).value) in ("PENDING", "RUNNING"), \
                client.get_job_logs(job)[-4000:]
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint within 480 s:\n" + client.get_job_logs(job)[-4000:])
        assert sorted(_placement(cluster, pids)) == [0, 1], ("one worker on each node", pids)
        killed_after = max(reg)
        assert killed_after < MAX_STEPS, "the run ended before the node could be lost"
        before = _actors(cluster)
        # the replacement boots while the cluster notices the loss and Train restarts the group
        # (its `ray start` takes seconds: it cannot join before the kill below)
        replacement = cluster.add_node(num_cpus=NODE_CPUS, env={"LLAMAPRO_CACHE": str(caches[2])},
                                       wait=False)
        cluster.kill_node(worker_node)

        placed_again, deadline = None, time.monotonic() + 600
        while time.monotonic() < deadline:
            status = str(client.get_job_status(job).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            assert replacement.proc.poll() is None, "the replacement node's `ray start` exited:\n" + \
                replacement.log.read_text()[-3000:]
            new = _worker_pids(runs)  # the restarted workers overwrite the pid files
            if placed_again is None and len(new) == 2 and not set(new.values()) & set(pids.values()):
                where = _placement(cluster, new)
                placed_again = where if -1 not in where else None
            time.sleep(0.5)
        logs = client.get_job_logs(job)
        if status != "SUCCEEDED":  # the cause is usually far above the tail of the traceback
            causes = [ln for ln in logs.splitlines()
                      if any(w in ln for w in ("Error", "Exception", "error:", "died"))]
            pytest.fail(f"job {status}; actors before the kill:\n{before}\nafter:\n{_actors(cluster)}\n"
                        f"nodes: {[n['node_id'][:8] for n in cluster.alive_nodes()]}\nerror lines:\n"
                        + "\n".join(causes[:60])[-8000:]
                        + "\n--- log tail ---\n" + logs[-3000:])
        assert "resuming at stage" in logs
        # after the restart, again one worker per node: the head and the replacement
        assert placed_again is not None and sorted(placed_again) == [0, 2], (placed_again, logs[-3000:])
        # every tokenizer actor ran where data.actor_resources sent it: the head
        head = [n["node_id"] for n in cluster.alive_nodes() if n.get("is_head_node")]
        actors = _actor_list(cluster)
        tokenizers = [a["node_id"] for a in actors if "_UnitProcessor" in a["class_name"]]
        assert tokenizers and set(tokenizers) == set(head), (head, _actors(cluster))
        # and the data pipelines' bookkeeping actors ran on the driver's node, the head
        stats = [a["node_id"] for a in actors if a["class_name"] == "_Stats"]
        assert stats and set(stats) == set(head), (head, _actors(cluster))

    events = [json.loads(line) for line in
              (work["shared_run"] / "metrics.jsonl").read_text().splitlines()]  # uploaded
    resumes = [e for e in events if e["event"] == "resume"]
    assert resumes, "the run restarted from scratch instead of resuming"
    assert resumes[0]["step"] >= killed_after and resumes[0]["step"] % EVERY == 0
    ran = [e["step"] for e in events if e["event"] == "step"]
    assert max(ran) == MAX_STEPS and ran.count(1) == 1  # never restarted from step 0
    meta = json.loads((work["shared_run"] / "model" / "llamapro.json").read_text())
    assert meta["kind"] == "trained" and meta["training"]["steps"] == MAX_STEPS
    # every worker node downloaded the expanded model into its own cache, from the URI
    expanded_uri = work["uri"] + "/expanded"
    for c in caches[1:]:
        assert (_node_copy(c, expanded_uri) / "llamapro.json").is_file(), c
    assert meta["training"]["trained_from"] == expanded_uri
    # and the driver's run copy holds what rank 0 uploaded, wherever rank 0 ran
    assert (runs[0] / "model" / "llamapro.json").read_text() == \
        (work["shared_run"] / "model" / "llamapro.json").read_text()
