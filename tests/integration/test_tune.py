"""`llamapro tune` on CPU: Ray Tune over real Ray Train + DeepSpeed trials of a tiny Llama.

One experiment searches two placement strategies (grid) with the LR drawn from a good and a
hopeless value (choice, seeded: tune.seed 1 draws good, then hopeless). One trial runs at a time, so
the hopeless trial starts after the good one has reported, and ASHA must stop it at its one rung
(step 2 of 4). It is started with
the `llamapro tune` command in a subprocess that is killed once a trial has a checkpoint, then the
same command resumes it (Tuner.restore; each Train run from its own checkpoint). The tests check the
table (CSV + Markdown), the Pareto plot, the best config (rerun with the function `llamapro train`
calls), each trial's reachable checkpoint and its own expansion from the base, that the base's
held-out losses equal the expanded models' (step 0), and that bad spaces fail before any trial.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import tiny_model
from tests.unit.eval_support import char_tokenizer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
GOOD_LR, HOPELESS_LR = 3e-3, 1e-9
MAX_STEPS = 4
# ASHA with grace_period 2, reduction_factor 4, max_t 4 has one rung, at step 2. Each trial evaluates,
# reports and checkpoints at every step. Tuner.restore restarts the scheduler empty (Ray keeps no
# scheduler state), so the good trial, resumed from its checkpoint at step 1, 2 or 3, must still be
# recorded at that rung after the restore: its first report at or beyond step 2 is (a rung at 4 would
# take a report at step 4 instead, and the hopeless trial would then meet an empty rung).


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tune_ray():
    """A fresh local cluster (never an earlier module's) as `llamapro tune` starts one: the
    dashboard on (Train V2 cleans up a stopped trial's placement group through the State API it
    serves), the trial-driver resource, and its address known to its workers (other engineers'
    Ray instances on this machine must not confuse that cleanup)."""
    import ray

    from llamapro.runtime import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray("tune test", num_cpus=8, resources={"llamapro_tune_driver": 100}, include_dashboard=True,
               publish_address=True, dashboard_port=_free_port(), log_to_driver=False,
               namespace="llamapro-tune-test")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama (4 layers) with a character tokenizer, a new-domain corpus and a retention one."""
    d = tmp_path_factory.mktemp("tune")
    tiny_model("llama", num_layers=4).save_pretrained(d / "base")
    char_tokenizer(d / "base")
    rng = random.Random(0)
    for name, words in (("dom", "apt dpkg mirror sources.list debconf kernel initramfs grub".split()),
                        ("ret", "def class import return lambda yield list dict".split())):
        (d / name).mkdir()
        with open(d / name / "part-0.jsonl", "w") as f:
            for _ in range(120):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(30, 60)))})
                        + "\n")
    return d


def _config(d: Path, name: str, space: dict, **tune) -> Path:
    cfg = {
        "run": {"name": name, "output_dir": str(d / "runs"), "seed": 0},
        "model": {"base": str(d / "base")},
        "expand": {"blocks": 2, "strategy": "even", "verify": True},
        "data": {"seq_len": 32, "actors": 1, "sources": [
            {"name": "dom", "paths": [str(d / "dom")], "weight": 0.7, "eval_fraction": 0.1},
            {"name": "ret", "paths": [str(d / "ret")], "weight": 0.3, "eval_fraction": 0.1}]},
        "train": {"max_steps": MAX_STEPS, "lr": GOOD_LR, "micro_batch_size": 4, "num_workers": 1,
                  "eval_every": 1, "eval_batches": 2, "checkpoint_every": MAX_STEPS, "zero_stage": 2,
                  "warmup_ratio": 0.0,
                  # fp32 on every machine: under bf16 (dtype auto where native) the frozen originals
                  # are bf16-rounded, so a model that learned nothing sits ~5e-4 nats off the fp32
                  # base and the hopeless trial's gain could not be checked at 1e-4
                  "dtype": "float32"},
        "tune": {"num_samples": 1, "max_concurrent": 1, "forgetting_penalty": 1.0,
                 "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 4},
                 "space": space, **tune},
    }
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _registered_checkpoints(exp: Path) -> list:
    """Checkpoints Ray Train has registered (persisted in a run's snapshot): what a restarted Train
    run resumes from."""
    out = []
    for snap in (exp / "trials").glob("*/ray/train-*/checkpoint_manager_snapshot.json"):
        try:
            out += json.loads(snap.read_text()).get("checkpoint_results", [])
        except (json.JSONDecodeError, OSError):
            continue
    return out


@pytest.fixture(scope="module")
def experiment(tune_ray, workspace):
    """`llamapro tune` killed mid-experiment (a subprocess on the same cluster), then resumed by
    running the same command again."""
    from llamapro import cli

    space = {"expand.placement": {"grid": ["even", "bottom"]},
             "train.lr": {"choice": [GOOD_LR, HOPELESS_LR]}}
    cfg = _config(workspace, "search", space, seed=1)
    exp = workspace / "runs" / "search-tune"
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=tune_ray.get_runtime_context().gcs_address)
    p = subprocess.Popen([sys.executable, "-m", "llamapro.cli", "tune", "--config", str(cfg)], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    killed = None
    try:
        while time.perf_counter() - t0 < 600 and p.poll() is None:
            state = list((exp / "experiment").glob("experiment_state*.json"))
            if state and _registered_checkpoints(exp):  # Tune's state saved, a Train checkpoint
                os.killpg(p.pid, signal.SIGKILL)      # registered: interrupt the experiment
                killed = time.perf_counter() - t0
                break
            time.sleep(0.2)
    finally:  # never leave the experiment running (it holds the cluster's CPUs)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert killed is not None, "the experiment never reached a checkpoint"
    t1 = time.perf_counter()
    code = cli.main(["tune", "--config", str(cfg)])  # the same command, in this process
    summary = json.loads((exp / "summary.json").read_text())
    summary.update(exit_code=code, killed_after_s=killed, resumed_s=time.perf_counter() - t1)
    print(f"\n[tune test] killed after {killed:.0f} s, resumed run took {summary['resumed_s']:.0f} s: "
          f"{summary['status']}")
    return summary


def _rows(summary) -> list[dict]:
    with open(summary["results_csv"]) as f:
        return list(csv.DictReader(f))


def _events(trial_dir: Path, kind: str) -> list[dict]:
    p = trial_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    return [e for e in map(json.loads, p.read_text().splitlines()) if e.get("event") == kind]


def test_interrupted_experiment_resumes(experiment):
    assert experiment["exit_code"] == 0 and experiment["resumed"]
    rows = _rows(experiment)
    resumed = [r for r in rows if _events(Path(r["trial_dir"]), "resume")]
    assert resumed, "no trial resumed its Train run from a checkpoint"
    for r in resumed:
        steps = [e["step"] for e in _events(Path(r["trial_dir"]), "step")]
        assert steps.count(1) == 1  # continued from its checkpoint, never restarted from scratch


def test_trials_are_real_runs_and_asha_stops_the_hopeless(experiment):
    rows = _rows(experiment)
    assert len(rows) == 2
    lr = {r["expand.placement"]: float(r["train.lr"]) for r in rows}
    # the seeded draw (the same config samples the same trials)
    assert lr == {"even": GOOD_LR, "bottom": HOPELESS_LR}
    hopeless = next(r for r in rows if r["expand.placement"] == "bottom")
    assert hopeless["status"] == "stopped early (asha, step 2)", hopeless
    assert int(hopeless["step"]) == 2 and abs(float(hopeless["domain_gain"])) < 1e-4
    done = [r for r in rows if r["status"] == "completed"]
    assert [r["expand.placement"] for r in done] == ["even"] and int(done[0]["step"]) == MAX_STEPS
    # each trial expanded the base itself (its own directory) with its own placement
    layers = {r["expand.placement"]: json.loads(r["new_layers"]) for r in rows}
    assert layers == {"even": [2, 5], "bottom": [0, 1]}
    assert len({r["trial_dir"] for r in rows}) == 2
    for r in rows:
        meta = json.loads((Path(r["trial_dir"]) / "expanded" / "llamapro.json").read_text())
        assert meta["verification"]["ok"]  # the identity was proven inside the trial
        # the trial's checkpoint is reachable: Ray Train's directory with the trainer state
        ckpt = Path(r["checkpoint"])
        assert ckpt.is_dir() and (ckpt / "trainer_state.json").is_file(), r["checkpoint"]
        # gain / forgetting / objective reported per trial, consistent with the losses
        gain = float(r["base_loss/dom"]) - float(r["eval_loss/dom"])
        forget = float(r["eval_loss/ret"]) - float(r["base_loss/ret"])
        assert float(r["domain_gain"]) == pytest.approx(gain, abs=1e-9)
        assert float(r["forgetting"]) == pytest.approx(forget, abs=1e-9)
        assert float(r["objective"]) == pytest.approx(gain - max(0.0, forget), abs=1e-9)
    assert all(float(r["domain_gain"]) > 0 for r in done)


def test_baseline_is_the_expanded_models_step0_loss(experiment, workspace):
    """The objective's reference: the base's held-out loss, computed once for every trial, equals
    each trial's expanded model's (its new blocks are identities)."""
    import torch

    from llamapro.eval import heldout_loss, load_model

    exp_dir = Path(experiment["dir"])
    rows = _rows(experiment)
    cached = [json.loads(p.read_text()) for p in (exp_dir / "baselines").glob("*.json")]
    assert len(cached) == 1  # every trial evaluated the same held-out rows
    for r in rows:
        assert float(r["base_loss/dom"]) == cached[0]["dom"]
        assert float(r["base_loss/ret"]) == cached[0]["ret"]
    base = load_model(str(workspace / "base"), dtype="float32")
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    blocks = {"input_ids": ids.numpy(), "labels": ids.numpy()}
    ref = heldout_loss(base, blocks)["loss"]
    for r in rows:
        exp = load_model(str(Path(r["trial_dir"]) / "expanded"), dtype="float32")
        assert heldout_loss(exp, blocks)["loss"] == ref


def test_outputs_table_plot_and_best_config_reruns(experiment, workspace):
    from llamapro import cli

    exp_dir = Path(experiment["dir"])
    md = (exp_dir / "results.md").read_text()
    assert md.count("\n| ") >= 3 and "(best)" in md and "stopped early (asha" in md
    png = exp_dir / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    best = experiment["best"]
    assert best is not None and best["status"] == "completed"
    rows = _rows(experiment)
    assert best["objective"] == pytest.approx(
        max(float(r["objective"]) for r in rows if r["status"] == "completed"))
    best_yaml = Path(experiment["best_config"])
    text = best_yaml.read_text()
    assert text.startswith("# The best configuration") and "llamapro train --config" in text
    d = yaml.safe_load(text)
    assert "tune" not in d and d["run"]["name"] == "search-tune-best"
    assert d["expand"]["strategy"] == best["expand.placement"] and d["train"]["lr"] == best["train.lr"]
    # rerun it exactly as `llamapro train --config best.yaml` does (same process, same cluster)
    assert cli.main(["train", "--config", str(best_yaml)]) == 0
    meta = json.loads((workspace / "runs" / "search-tune-best" / "model" / "llamapro.json").read_text())
    assert meta["new_layer_indices"] == json.loads(best["new_layers"])
    assert meta["training"]["steps"] == MAX_STEPS


def test_bad_tune_configs_fail_before_any_trial(workspace):
    from llamapro.config import ConfigError, load_config
    from llamapro.tune import run_tune

    cases = [
        ({"expand.placement": {"grid": ["even", "sideways"]}}, "value 'sideways'.*choose one of"),
        ({"expand.placement": {"grid": [[0, 0]]}}, r"duplicate positions \[0\]"),
        ({"expand.placement": {"grid": [[9]]}}, r"positions \[9\] are out of range"),
        ({"train.num_stages": {"choice": [1, 3]}}, "value 3.*only 2 new blocks"),
        ({"train.zero_stage": {"choice": [2, 4]}}, "value 4.*zero_stage"),
        ({"train.lr": {"loguniform": [0, 1]}}, "needs low > 0"),
        ({"train.lrr": {"choice": [1]}}, "no config key 'train.lrr'"),
        ({"run.output_dir": {"choice": ["x"]}}, "cannot be searched"),
    ]
    for space, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            run_tune(load_config(_config(workspace, "bad", space)))
    with pytest.raises(ConfigError, match="'nope' is not a data source"):
        run_tune(load_config(_config(workspace, "bad", {"train.lr": {"choice": [1e-3]}},
                                     retention_sets=["nope"])))
    with pytest.raises(ConfigError, match="tune.space is empty"):
        run_tune(load_config(_config(workspace, "bad", {})))
    assert not (workspace / "runs" / "bad-tune").exists()


def test_objective_is_computed_from_a_report_and_travels_to_workers():
    """What the training loop adds to each report (the stock TuneReportCallback then forwards
    rank 0's metrics as they are): picklable, stateless, a set not evaluated counts at the base."""
    import pickle

    from ray.tune.integration.ray_train import TuneReportCallback  # noqa: F401  (the stock callback exists)

    from llamapro import tune

    plan = {"domain_sets": ["dom"], "retention_sets": ["ret"], "penalty": 2.0, "max_forgetting": 0.05}
    obj = pickle.loads(pickle.dumps(tune.TrialObjective.of({"dom": 3.0, "ret": 2.0}, plan)))
    m = obj({"step": 4, "eval_loss/dom": 2.5, "eval_loss/ret": 2.1})
    assert m["objective"] == pytest.approx(0.5 - 2.0 * 0.1) and m["base_loss/dom"] == 3.0
    assert obj({"step": 1})["objective"] == 0.0  # before any evaluation the model is the base
    # the loop computes it (run_training(report_metrics=...)); Ray's stock callback forwards it:
    # nothing of Ray's private queue is touched
    import inspect

    from llamapro.training import run_training

    assert "report_metrics" in inspect.signature(run_training).parameters
    src = inspect.getsource(tune._reporting)
    assert "TuneReportCallback()" in src and "_training_actor_item_queue" not in inspect.getsource(tune)
    for part in Path(tune.__file__).parent.glob("*.py"):  # every module of the package, not only its facade
        assert "_training_actor_item_queue" not in part.read_text(), part
