"""The console of `llamapro train` on a tiny model, as a user sees it (a fresh process, Ray started
by the command, Ray's log forwarding on): the driver's progress lines on stdout, none of Ray's INFO
lines or workers' raw output on the screen, and all of it in RUN/logs/ray.log (issue 17)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"^      train stage (\d)/2 step (\d+)/(\d+) loss \d+\.\d{4} \| [\d,]+ tok/s \| "
                      r"\d+:\d\d elapsed, (?:~\d+:\d\d left|warm-up step)$", re.M)


def test_train_console_shows_progress_and_keeps_ray_output_in_the_run_log(tmp_path):
    from tests.unit.eval_support import make_base

    base = make_base(tmp_path / "model")
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for n in range(200):
            f.write(json.dumps({"text": f"apt-get install pkg{n}; dpkg -i pkg{n}.deb unpacks it. " * 3}) + "\n")
    cfg = {"run": {"name": "console", "output_dir": str(tmp_path / "runs")},
           "model": {"base": str(base)},
           "expand": {"blocks": 2, "verify": False},  # the proof is tested elsewhere: save its time
           "data": {"seq_len": 24, "actors": 1,
                    "sources": [{"name": "apt", "paths": [str(corpus)], "weight": 1.0, "eval_fraction": 0.2}]},
           "train": {"max_tokens": 0, "max_steps": 4, "num_stages": 2, "num_workers": 1, "micro_batch_size": 2,
                     "eval_every": 2, "eval_batches": 1, "checkpoint_every": 4, "patience": 0,
                     "allow_unproven": True}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    r = subprocess.run([sys.executable, "-m", "llamapro.cli", "train", "--config", str(tmp_path / "cfg.yaml")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    screen = r.stdout + r.stderr
    (tmp_path / "screen.txt").write_text(screen)  # what the user saw, for a failure's post-mortem
    assert r.returncode == 0, screen[-4000:]
    run = tmp_path / "runs" / "console"
    log = run / "logs" / "ray.log"

    # the product's progress, from the driver: every step of the schedule, ending at the last one
    lines = PROGRESS.findall(r.stdout)
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["event"] == "step"]
    assert lines and {int(n) for _, _, n in lines} == {len(steps)} == {4}, r.stdout
    assert [int(k) for _, k, _ in lines][-1] == 4 and {s for s, _, _ in lines} == {"1", "2"}, r.stdout
    assert "held-out loss at step 2: apt " in r.stdout
    for k in (1, 2):  # the workers' own stage lines, once each (Ray forwards them twice)
        assert r.stdout.count(f"      stage {k}/2 ") == 1, r.stdout
    assert f"Ray's logs: {log}" in r.stdout

    # Ray's own output is not on the screen ...
    for noise in ("Started a local Ray instance", "INFO", "Progress bars disabled", "(RayTrainWorker",
                  "(TrainController", "pid=", "core_worker.cc", "PYTHON worker processes"):
        assert noise not in screen, f"{noise!r} reached the screen:\n{screen[-4000:]}"
    # ... it is in the run's log: Ray's INFO lines and the workers' forwarded output
    text = log.read_text()
    assert re.search(r"INFO worker\.py:\d+ -- Started a local Ray instance", text), text[:3000]
    assert re.search(r"\(RayTrainWorker pid=\d+\) \[llamapro\] step +4 stage 1 loss", text), text[-3000:]


NOISE_SCRIPT = r"""
import os, sys
import ray
from llamapro.runtime import ensure_ray, ray_log_file

class Echo:
    def __init__(self, setup):
        self.setup = setup
    def __call__(self, batch):
        return batch

with ray_log_file(sys.argv[1]):
    ensure_ray("noise test", num_cpus=2, include_dashboard=False, quiet_data=True)
    # an actor pool executed by this driver: Ray's core worker logs its error-level line for it
    ds = ray.data.range(4).map_batches(Echo, fn_constructor_kwargs={"setup": "x"}, batch_size=1,
                                       compute=ray.data.ActorPoolStrategy(size=1))
    assert len(ds.take_all()) == 4
    # the raylet's notice, as the driver's error listener prints it
    ray._private.worker.print_to_stdstream(
        {"lines": ["WARNING: 8 PYTHON worker processes have been started on node: x"], "pid": "raylet",
         "is_err": False}, ignore_prefix=False)
    # anything else Ray (or C code) writes to stderr still reaches the screen, partial line included
    os.write(2, b"[2026-12-03 10:00:00,000 E 1 1] core_worker.cc:1: a real core worker error\n")
    ray._private.worker.print_to_stdstream(
        {"lines": ["a real raylet message"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    os.write(2, b"no newline at the end")
ray.shutdown()
os.write(2, b"\nafter the block\n")
"""


def test_rays_known_noise_goes_to_the_log_and_everything_else_to_the_screen(tmp_path):
    """Two lines Ray prints past its loggers (the C++ core worker's error line for every Ray Data
    actor pool, the raylet's worker-count notice) go to the run's log only; other lines on the
    same paths still reach the user, and stderr is whole again after the command."""
    log = tmp_path / "ray.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", NOISE_SCRIPT, str(log)], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    screen = r.stdout + r.stderr
    assert "has constructor arguments in the object store" not in screen, screen[-4000:]
    assert "PYTHON worker processes have been started" not in screen, screen[-4000:]
    for kept in ("a real core worker error", "a real raylet message", "no newline at the end",
                 "after the block"):
        assert kept in screen, f"{kept!r} did not reach the screen:\n{screen[-4000:]}"
    text = log.read_text()
    assert re.search(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(MapBatches\(Echo\)\)'.*"
                     r"has constructor arguments in the object store", text), text[-3000:]
    assert "(raylet) WARNING: 8 PYTHON worker processes have been started" in text, text[-3000:]
    assert "a real core worker error" not in text
