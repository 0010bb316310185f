"""`llamapro eval|export|fuse` on a ``file://`` run URI do exactly what jobs/eval.py, export.py and
fuse.py do: the same step functions (llamapro.pipeline), the same downloads and uploads, the same
outputs in the bucket. Two buckets hold the same uploaded run; the jobs work on one, the CLI on the
other. A tiny Llama with a character tokenizer; no Ray (no held-out sets: greedy agreement only).
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import yaml

from llamapro import storage
from llamapro.cli import main
from llamapro.tensors import content_digest
from tests.unit.eval_support import make_run

REPO = Path(__file__).resolve().parents[2]
FUSE = ["--method", "weighted", "--alpha", "0.5"]


def _job(name: str, argv) -> int:
    return runpy.run_path(str(REPO / "jobs" / f"{name}.py"), run_name="test")["main"](argv)


@pytest.fixture(scope="module")
def buckets(tmp_path_factory):
    root = tmp_path_factory.mktemp("uri")
    run = make_run(root, "src", perturb=0.02)
    cfg = {"run": {"name": "tiny"}, "model": {"base": str(root / "base")},
           "eval": {"prompts": str(REPO / "jobs/data/regression_prompts.jsonl"), "max_prompts": 2,
                    "max_new_tokens": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    uris = {}
    for b in ("jobs", "cli"):  # the same run, uploaded (with manifests) as train_step leaves it
        uris[b] = f"file://{root}/{b}/runs/tiny"
        for rel in ("model", "metrics.jsonl", "config.yaml"):
            storage.upload(run / rel, storage.join(uris[b], rel))
    return {"root": root, "config": str(config), "uris": uris}


# when, how long, how much memory: the only differences allowed between two runs of a step
TIMES = {"at", "fused_at", "evaluated_at", "seconds", "eval_seconds", "elapsed_s", "eval_peak_rss_bytes"}


def _normalized(path: Path, b: dict, which: str) -> dict:
    """A JSON file with the bucket's URI and its local working copy spelled the same way, and
    without timestamps and durations."""
    text = path.read_text()
    uri = b["uris"][which]
    for s in (str(storage.local_dir(uri)), uri.removeprefix("file://"), uri):
        text = text.replace(s, "RUN")

    def scrub(x):
        if isinstance(x, dict):
            return {k: scrub(v) for k, v in x.items() if k not in TIMES}
        return [scrub(v) for v in x] if isinstance(x, list) else x

    return scrub(json.loads(text))


def _diff(a, b, where=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _diff(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_eval_export_fuse_on_a_uri_run_equal_the_jobs(buckets, capsys):
    b, cfg = buckets, buckets["config"]
    job_args = ["--config", cfg, f"run.output_dir={b['uris']['jobs'].rsplit('/', 1)[0]}"]
    assert _job("eval", job_args) == 0
    assert _job("export", job_args) == 0
    assert _job("fuse", [*job_args, "fuse.method=weighted", "fuse.alpha=0.5"]) == 0
    assert "alpha 0.5" in capsys.readouterr().out

    uri = b["uris"]["cli"]
    assert main(["eval", "--config", cfg, "--run", uri, "-q"]) == 0
    assert main(["export", uri, f"{uri}/export", "-q"]) == 0
    assert main(["fuse", uri, f"{uri}/fused", "--config", cfg, *FUSE, "-q"]) == 0
    assert "alpha 0.5" in capsys.readouterr().out

    jobs, cli = (b["root"] / w / "runs" / "tiny" for w in ("jobs", "cli"))
    # the same files were uploaded, each a complete upload with its manifest
    assert _files(jobs) == _files(cli)
    assert {"eval", "report", "export", "fused"} <= {p.name for p in cli.iterdir()}
    for d in ("eval", "report", "export", "fused"):
        storage.check_complete(storage.join(uri, d))
    res = {w: _normalized(r / "eval" / "results.json", b, w) for w, r in (("jobs", jobs), ("cli", cli))}
    assert res["cli"] == res["jobs"], _diff(res["cli"], res["jobs"])
    assert res["cli"]["run_dir"] == "RUN" and res["cli"]["gate"]["passed"]
    for d in ("export", "fused"):
        assert content_digest(cli / d) == content_digest(jobs / d), d
        meta = {w: _normalized(r / d / "llamapro.json", b, w) for w, r in (("jobs", jobs), ("cli", cli))}
        assert meta["cli"] == meta["jobs"], (d, _diff(meta["cli"], meta["jobs"]))
    assert json.loads((cli / "fused" / "llamapro.json").read_text())["fusion"]["alpha"] == 0.5


def test_a_missing_uri_run_is_bad_input(buckets, capsys):
    missing = buckets["uris"]["cli"].replace("/tiny", "/nothing")
    assert main(["export", missing, f"{missing}/export", "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
