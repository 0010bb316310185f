"""jobs/*.py submitted to a real token-authenticated Ray head (`ray start --head`, its own temp dir
and ports), with the `ray job submit` CLI and with `JobSubmissionClient`, on a tiny random model.

The run directory is a ``file://`` URI: every step reads and writes it through pyarrow's
filesystems exactly as it would ``s3://``, and Ray Train checkpoints go straight to it.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
import yaml

from tests.integration.ray_cli_cluster import ROOT, LocalCluster, free_port, wait_job
from tests.unit.eval_support import make_base

pytestmark = pytest.mark.integration

WORDS = ("the package manager installs configures removes upgrades a system service file path "
         "kernel module network daemon user group log option default value").split()


def _text(i: int) -> str:
    w = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)]
    return " ".join(w).capitalize() + "."


@pytest.fixture(scope="module")
def cluster(work):
    # a Train worker + tokenizer actors + Serve replicas; the nodes' env carries our llamapro cache
    with LocalCluster(num_cpus=4, env={"LLAMAPRO_CACHE": str(work["root"] / "cache")}) as c:
        yield c
    assert not c.leftovers(), "a process of our cluster outlived it"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    base = make_base(root, chat=True)  # tiny Llama + a real character-level tokenizer
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": _text(i)}) + "\n" for i in range(120)))
    bucket = root / "bucket"
    cfg = {
        "run": {"name": "tiny", "output_dir": f"file://{bucket}/runs"},
        "model": {"base": str(base)},
        "expand": {"blocks": 2, "strategy": "even", "verify": True},
        "data": {"seq_len": 32, "actors": 1, "sources": [
            {"name": "domain", "paths": [str(corpus)], "weight": 1.0, "eval_fraction": 0.1}]},
        # one Train worker: jobs/train.py with two (one per node, a node lost) is test_two_node.py
        "train": {"max_steps": 4, "micro_batch_size": 2, "num_workers": 1, "zero_stage": 2,
                  "lr": 1e-3, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": str(path), "run": bucket / "runs" / "tiny", "base": base,
            "runtime_env": {"working_dir": str(ROOT),
                            **yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())}}


def _submit_cli(cluster, *entrypoint: str, timeout: float = 600):
    """`ray job submit` exactly as the jobs/ docstrings show it."""
    return cluster.cli("job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
                       "--runtime-env", "cluster/runtime_env.yaml", "--", "python", *entrypoint,
                       timeout=timeout)


def test_token_auth_is_on(cluster):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    r = cluster.cli("job", "list", "--address", cluster.dashboard_url,
                    env={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""}, timeout=120)
    assert r.returncode != 0 and "Unauthorized" in r.stdout + r.stderr
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": "Bearer wrong"})
    assert isinstance(cluster.job_client().list_jobs(), list)  # the right token is accepted


def test_expand_with_ray_job_submit(cluster, work):
    r = _submit_cli(cluster, "jobs/expand.py", "--config", work["config"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + cluster.log_tail()
    assert "succeeded" in r.stdout + r.stderr
    meta = json.loads((work["run"] / "expanded" / "llamapro.json").read_text())  # in the bucket
    assert meta["num_layers"] == 6 and len(meta["new_layer_indices"]) == 2
    assert meta["verification"]["ok"]


def test_data_preview_with_job_submission_client(cluster, work):
    client = cluster.job_client()
    job = client.submit_job(entrypoint=f"python jobs/data.py --config {work['config']} --json",
                            runtime_env=work["runtime_env"])
    assert wait_job(client, job, 300) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
    logs = client.get_job_logs(job)
    report = json.loads(logs[logs.index("{"):logs.rindex("}") + 1])
    assert report["ok"] and report["sources"][0]["blocks_packed"] > 0


def test_train_with_job_submission_client(cluster, work):
    client = cluster.job_client()
    job = client.submit_job(entrypoint=f"python jobs/train.py --config {work['config']}",
                            runtime_env=work["runtime_env"], submission_id="llamapro-train-tiny")
    status = wait_job(client, job, 600)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:] + cluster.log_tail()
    assert "trained model:" in logs
    # issue 17: the driver's progress lines reach the job's logs; the workers' raw lines do not
    assert re.search(r"train stage 1/1 step 4/4 loss \d+\.\d{4} \| [\d,]+ tok/s \|", logs), logs[-3000:]
    assert "(RayTrainWorker" not in logs
    run = work["run"]
    meta = json.loads((run / "model" / "llamapro.json").read_text())
    assert meta["kind"] == "trained" and meta["training"]["steps"] == 4
    steps = [e["step"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "step"]
    assert steps == [1, 2, 3, 4]
    # Ray Train persisted its checkpoints to the shared URI itself, not to a local directory
    assert list((run / "ray" / "tiny-llamapro").glob("checkpoint_*"))


def test_serve_job_deploys_an_app_that_outlives_the_job(cluster, work):
    port = free_port()
    cfg = work["root"] / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {
        "app_name": "tiny", "host": "127.0.0.1", "port": port,
        "models": {"base": {"path": str(work["base"]), "num_cpus": 0.5}},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "ingress": {"num_cpus": 0.1}}}))
    r = _submit_cli(cluster, "jobs/serve.py", "--config", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "smoke: base answered" in r.stdout
    # the job has ended; the app keeps serving
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["base", "llamapro"]
    client = cluster.job_client()  # --delete through the Python client (the CLI deployed above)
    job = client.submit_job(entrypoint=f"python jobs/serve.py --config {cfg} --delete",
                            runtime_env=work["runtime_env"])
    assert wait_job(client, job, 300) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
    assert "deleted Serve app 'tiny'" in client.get_job_logs(job)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30)
