"""Resume faults: a crafted pickle in a checkpoint, a corrupt or incomplete latest checkpoint, and a
ZeRO-3 run resuming. One tiny ZeRO-3 run (one worker, ordered data) keeps every checkpoint; each
test copies it into a "dead run" that kept only some of them, damages them, and reruns under the
same name: the resumed steps must match the uninterrupted run's losses exactly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamapro.config.train import TrainConfig
from llamapro.errors import CheckpointError
from llamapro.expansion import api as steps
from llamapro.training import run_training
from llamapro.training.resume import (
    MANIFEST,
    deepspeed_safe_loading,
    first_valid,
    safe_torch_load,
    write_manifest,
)
from tests.integration.test_train import _ordered_data
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.integration
SEQ = 32
NAME = "z3"


class _Exploit:
    """Unpickled by a full unpickler, this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _plant(pt: Path, marker: Path) -> None:
    """What an attacker with write access to the checkpoint store does: add a code-running object to
    a DeepSpeed file and keep the manifest consistent with it."""
    sd = safe_torch_load(pt, map_location="cpu")
    sd["client_note"] = _Exploit(marker)
    torch.save(sd, pt)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(pt))
    assert any(g.endswith(".system") for g in unsafe), unsafe  # a live exploit, not a dud


def _rewrite_manifest(ckpt: Path, rank: int = 0) -> None:
    m = json.loads((ckpt / MANIFEST.format(rank=rank)).read_text())
    (ckpt / MANIFEST.format(rank=rank)).unlink()
    write_manifest(ckpt, rank, m["world"], m["global_step"])


# --- the safe loader and the choice, without Ray ------------------------------------------------------

def test_crafted_pickle_is_refused_by_every_load_path(tmp_path):
    live, marker = tmp_path / "live-marker", tmp_path / "marker"
    torch.save({"w": torch.ones(2), "x": _Exploit(live)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # the old resume path runs it
    assert live.exists()
    torch.save({"w": torch.ones(2), "x": _Exploit(marker)}, tmp_path / "evil.pt")

    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt: it holds global \w+\.system"):
        safe_torch_load(tmp_path / "evil.pt")

    class _Engine:  # DeepSpeed's engine as deepspeed_safe_loading sees it
        checkpoint_engine = type("TorchCheckpointEngine", (), {"name": "torch"})()

    eng = _Engine()
    with deepspeed_safe_loading(eng):
        assert eng.checkpoint_engine.name == "torch"
        with pytest.raises(CheckpointError, match="refused"):
            eng.checkpoint_engine.load(str(tmp_path / "evil.pt"), map_location="cpu")
        with pytest.raises(CheckpointError, match="refused"):  # DeepSpeed's direct torch.load calls
            torch.load(tmp_path / "evil.pt", map_location="cpu", weights_only=False)
    assert eng.checkpoint_engine.name == "torch" and not hasattr(eng.checkpoint_engine, "_inner")
    assert torch.load is safe_torch_load.__globals__["_TORCH_LOAD"]  # restored
    assert not marker.exists()


def _fake_checkpoint(d: Path, step: int, world: int = 1) -> Path:
    """A checkpoint as the workers' save_checkpoint leaves it: each rank writes its files and its
    manifest last in its own directory, and the storage holds their union."""
    for r in range(world):
        part = d.parent / f"{d.name}-rank{r}"
        (part / "ds" / "state").mkdir(parents=True)
        torch.save({"optimizer_state_dict": {"m": torch.full((4,), float(step))}},
                   part / "ds" / "state" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        if r == 0:
            (part / "trainer_state.json").write_text(
                json.dumps({"stage": 0, "step_in_stage": step, "global_step": step}))
            save_file({"w": torch.ones(3)}, str(part / "trained.safetensors"))
        write_manifest(part, r, world, step)
        shutil.copytree(part, d, dirs_exist_ok=True)
    return d


def _candidates(dirs):
    return [(str(d), lambda dst, d=d: shutil.copytree(d, dst, dirs_exist_ok=True)) for d in dirs]


def test_first_valid_skips_and_names_bad_checkpoints(tmp_path):
    c2, c4, c6 = (_fake_checkpoint(tmp_path / f"ckpt{s}", s) for s in (2, 4, 6))
    (c6 / MANIFEST.format(rank=0)).unlink()  # never finished
    pt = c4 / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.truncate(pt, pt.stat().st_size // 2)  # torn write
    got = first_valid(_candidates([c6, c4, c2]), rank=0)
    assert got.source == str(c2) and json.loads((got.local_dir / "trainer_state.json").read_text())["global_step"] == 2
    assert [s for s, _ in got.rejected] == [str(c6), str(c4)]
    assert "no manifest-rank0.json" in got.rejected[0][1]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in got.rejected[1][1] and "bytes" in got.rejected[1][1]

    bad = _fake_checkpoint(tmp_path / "flip", 8)
    with open(bad / "trained.safetensors", "r+b") as f:  # same size, one byte flipped
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint among the 3 kept: .*flip: trained"
                                              r"\.safetensors does not match its SHA-256.*ckpt6.*ckpt4"):
        first_valid(_candidates([bad, c6, c4]), rank=0)

    # two ranks: a missing rank-1 manifest is incomplete; rank 0 hears rank 1's verdict
    two = _fake_checkpoint(tmp_path / "two", 4, world=2)
    assert first_valid(_candidates([two]), rank=1).source == str(two)
    (two / MANIFEST.format(rank=1)).unlink()
    with pytest.raises(CheckpointError, match="no manifest-rank1.json"):
        first_valid(_candidates([two]), rank=0)
    ok = _fake_checkpoint(tmp_path / "ok", 2, world=2)
    calls = []

    def gather(reason):  # rank 1 could not read the first candidate
        calls.append(reason)
        return [reason, "OSError: disk read error" if len(calls) == 1 else None]

    got = first_valid(_candidates([ok, c2]), rank=0, gather=gather)
    assert got.source == str(c2) and got.rejected == [(str(ok), "rank 1: OSError: disk read error")]


# --- the dead runs ----------------------------------------------------------------------------------

def _tc(**kw):
    return TrainConfig(**{"max_steps": 8, "lr": 3e-3, "micro_batch_size": 4, "eval_every": 100,
                          "checkpoint_every": 2, "keep_checkpoints": 10, "max_failures": 0,
                          "zero_stage": 3, "num_workers": 1, **kw})


def _events(out, kind):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def reference(ray_start_4_cpus, tmp_path_factory):
    """The uninterrupted ZeRO-3 run: every checkpoint (steps 2, 4, 6 mid-stage, 8 final) kept."""
    d = tmp_path_factory.mktemp("resume")
    tiny_model("llama", num_layers=4).save_pretrained(d / "base")
    steps.expand(str(d / "base"), str(d / "exp"), blocks=2, strategy="even", progress=False)
    ds, ev = _ordered_data(ray_start_4_cpus)
    res = run_training(_tc(), str(d / "exp"), str(d / "ref"), ds, ev, seq_len=SEQ, name=NAME)
    assert res.error is None and res.metrics["final"]
    assert [s["zero_stage"] for s in _events(d / "ref", "stage_start")] == [3]
    return d


def _dead_run(reference: Path, test: str, kept_steps: list[int]) -> tuple[Path, dict[int, Path]]:
    """A copy of the reference run's storage as if it had died after the last of ``kept_steps``
    with only those checkpoints kept; returns its run directory and the checkpoints by step."""
    run = reference / test
    src, dst = reference / "ref" / "ray" / NAME, run / "ray" / NAME
    shutil.copytree(src, dst)
    snap_path = dst / "checkpoint_manager_snapshot.json"
    snap = json.loads(snap_path.read_text())
    pairs = [(i, r) for i, r in zip(snap["checkpoint_report_indices"], snap["checkpoint_results"])
             if r["metrics"]["step"] in kept_steps and not r["metrics"].get("final")]
    kept = {r["checkpoint_dir_name"] for _, r in pairs}
    for r in snap["checkpoint_results"]:
        if r["checkpoint_dir_name"] not in kept:
            shutil.rmtree(dst / r["checkpoint_dir_name"])
    snap.update(checkpoint_report_indices=[i for i, _ in pairs], checkpoint_results=[r for _, r in pairs],
                latest_checkpoint_result=pairs[-1][1], current_report_index=pairs[-1][0] + 1)
    snap_path.write_text(json.dumps(snap))
    ckpts = {r["metrics"]["step"]: dst / r["checkpoint_dir_name"] for _, r in pairs}
    assert sorted(ckpts) == sorted(kept_steps)
    return run, ckpts


def _rerun(ray, reference: Path, run: Path):
    ds, ev = _ordered_data(ray)
    res = run_training(_tc(), str(reference / "exp"), str(run), ds, ev, seq_len=SEQ, name=NAME,
                       storage_path=str(run / "ray"))
    assert res.error is None and res.metrics["final"]
    return res


def _assert_resumed_exactly(reference: Path, run: Path, from_step: int) -> None:
    """Resumed at ``from_step`` and went on as the uninterrupted run did: same losses and learning
    rates (optimizer and scheduler restored, not restarted), same trained model."""
    (resume,) = _events(run, "resume")
    assert resume["step"] == from_step
    ref = {e["step"]: e for e in _events(reference / "ref", "step")}
    ran = _events(run, "step")
    assert [e["step"] for e in ran] == list(range(from_step + 1, 9))
    for e in ran:
        r = ref[e["step"]]
        assert abs(e["loss"] - r["loss"]) <= 1e-5 * max(1.0, r["loss"]), (e["step"], e["loss"], r["loss"])
        assert e["lr"] == pytest.approx(r["lr"])
    assert [s["zero_stage"] for s in _events(run, "stage_start")] == [3]
    want = load_file(reference / "ref" / "model" / "model.safetensors")
    got = load_file(run / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_zero3_run_resumes_where_it_stopped(ray_start_4_cpus, reference):
    run, ckpts = _dead_run(reference, "clean", [4, 6])
    _rerun(ray_start_4_cpus, reference, run)
    assert not _events(run, "checkpoint_rejected")
    assert _events(run, "resume")[0]["checkpoint"].endswith(ckpts[6].name)
    _assert_resumed_exactly(reference, run, 6)


def test_corrupt_latest_checkpoints_fall_back_and_are_named(ray_start_4_cpus, reference):
    run, ckpts = _dead_run(reference, "corrupt", [2, 4, 6])
    (ckpts[6] / MANIFEST.format(rank=0)).unlink()  # died while writing it
    (pt,) = (ckpts[4] / "ds" / "state").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")  # bf16_ on bf16 CPUs
    os.truncate(pt, pt.stat().st_size - 100)  # torn by a full disk
    _rerun(ray_start_4_cpus, reference, run)
    rejected = _events(run, "checkpoint_rejected")
    assert [Path(e["checkpoint"]).name for e in rejected] == [ckpts[6].name, ckpts[4].name]
    assert "no manifest-rank0.json" in rejected[0]["reason"]
    assert pt.name in rejected[1]["reason"] and "bytes" in rejected[1]["reason"]
    assert _events(run, "resume")[0]["checkpoint"].endswith(ckpts[2].name)
    _assert_resumed_exactly(reference, run, 2)


def test_crafted_pickle_in_a_checkpoint_never_runs(ray_start_4_cpus, reference):
    run, ckpts = _dead_run(reference, "pickle", [4, 6])
    marker = run / "pwned"
    _plant(ckpts[6] / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    _rewrite_manifest(ckpts[6])  # the attacker keeps the manifest consistent
    _rerun(ray_start_4_cpus, reference, run)
    assert not marker.exists()
    (rejected,) = _events(run, "checkpoint_rejected")
    assert Path(rejected["checkpoint"]).name == ckpts[6].name
    assert "refused to load" in rejected["reason"] and ".system" in rejected["reason"]
    _assert_resumed_exactly(reference, run, 4)
