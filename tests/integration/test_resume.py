"""Resume faults: a run killed and rerun under the same name, a crafted pickle in a checkpoint, a
corrupt or incomplete latest checkpoint; every one a ZeRO-3 run resuming. One tiny ZeRO-3 run (one
worker, ordered data; conftest's ``zero3_reference``) keeps every checkpoint; a run killed for real
and a copy of the reference that "died" with damaged checkpoints are rerun under the same name: the
resumed steps must match the uninterrupted run's losses exactly. (A full disk at a checkpoint:
test_disk_full.py, on the same reference.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llamapro.config.train import TrainConfig
from llamapro.errors import CheckpointError
from llamapro.training import run_training
from llamapro.training.resume import (
    MANIFEST,
    deepspeed_safe_loading,
    first_valid,
    safe_torch_load,
    write_manifest,
)
from tests.integration.training_helpers import (
    SEQ,
    ZERO3,
    assert_resumed_exactly,
    data,
    events,
    kill_at_checkpoint,
)

pytestmark = pytest.mark.integration


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


def test_a_checkpoint_write_that_finds_no_room_is_named(tmp_path):
    """writing_checkpoint (around the workers' checkpoint writes; the run itself:
    test_disk_full.py): ENOSPC (a real full device), torch.save stopping short, and an unrelated
    error, which passes through untouched."""
    from llamapro.errors import TrainingError
    from llamapro.training.resume import writing_checkpoint

    with pytest.raises(TrainingError, match=r"^disk full: the checkpoint of step 6 could not be "
                                            r"written to .*\[Errno 28\] No space left on device; .* MiB free"):
        with writing_checkpoint(tmp_path, 6), open("/dev/full", "wb") as f:
            f.write(b"x" * 100_000)
            f.flush()
    with pytest.raises(TrainingError, match=r"torch.save's writer stopped short \(unexpected pos"):
        with writing_checkpoint(tmp_path, 6):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(KeyError, match="unrelated"):
        with writing_checkpoint(tmp_path, 6):
            raise KeyError("unrelated")


# --- the dead runs ----------------------------------------------------------------------------------

def _rerun(ray, expanded: Path, run: Path, name: str, **kw):
    ds, ev = data(ray, ordered=True)
    return run_training(TrainConfig(**ZERO3), str(expanded / "exp"), str(run), ds, ev, seq_len=SEQ, name=name,
                        storage_path=str(run / "ray"), **kw)


def test_rerun_with_same_name_resumes(ray_start_4_cpus, expanded, zero3_reference):
    """A run that dies (SIGKILL, no failure budget) picks up from its latest checkpoint when it is
    simply rerun with the same name and storage path - the "my job was preempted" path. With one
    worker and an ordered stream, the resumed run goes on through the data exactly where the dead
    one was: its losses, learning rates and model are those of the same run never interrupted."""
    run = expanded / "rerun"
    marker = expanded / "rerun.killed"
    hook = kill_at_checkpoint(6, rank=0, storage=run / "ray" / "rerun", registered=4, marker=marker)
    try:
        failed = _rerun(ray_start_4_cpus, expanded, run, "rerun", report_metrics=hook).error
    except Exception as e:  # Train V2 raises on an exhausted failure budget
        failed = e
    assert marker.exists() and failed is not None, "the first attempt should have died"
    assert not (run / "model").exists()

    res = _rerun(ray_start_4_cpus, expanded, run, "rerun")
    assert res.error is None and res.metrics["final"]
    assert not events(run, "checkpoint_rejected")
    assert [e["step"] for e in events(run, "step")][:6] == [1, 2, 3, 4, 5, 6]  # the dead attempt's
    assert_resumed_exactly(zero3_reference, run, 4)
    assert (run / "model" / "config.json").is_file()


def _dead_run(reference: Path, run: Path, kept_steps: list[int]) -> dict[int, Path]:
    """A copy of the reference run's storage (``run/ray/<name>``) as if it had died after the last
    of ``kept_steps`` with only those checkpoints kept; returns the checkpoints by step."""
    name = reference.name
    src, dst = reference / "ray" / name, run / "ray" / name
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
    return ckpts


def test_corrupt_latest_checkpoints_and_a_crafted_pickle_fall_back_and_are_named(
        ray_start_4_cpus, expanded, zero3_reference):
    """The run died with four checkpoints kept: the newest without its manifest (died while writing
    it), the next with a file torn by a full disk, the next with a crafted pickle (its manifest kept
    consistent by the attacker). Each is skipped and named, the payload never runs, and the run
    resumes from the oldest, exactly."""
    run = expanded / "damaged"
    ckpts = _dead_run(zero3_reference, run, [2, 4, 6, 8])
    (ckpts[8] / MANIFEST.format(rank=0)).unlink()  # died while writing it
    (pt,) = (ckpts[6] / "ds" / "state").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")  # bf16_ on bf16 CPUs
    os.truncate(pt, pt.stat().st_size - 100)  # torn by a full disk
    marker = run / "pwned"
    _plant(ckpts[4] / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    _rewrite_manifest(ckpts[4])  # the attacker keeps the manifest consistent

    res = _rerun(ray_start_4_cpus, expanded, run, zero3_reference.name)
    assert res.error is None and res.metrics["final"]
    assert not marker.exists()
    rejected = events(run, "checkpoint_rejected")
    assert [Path(e["checkpoint"]).name for e in rejected] == [ckpts[s].name for s in (8, 6, 4)]
    assert "no manifest-rank0.json" in rejected[0]["reason"]
    assert pt.name in rejected[1]["reason"] and "bytes" in rejected[1]["reason"]
    assert "refused to load" in rejected[2]["reason"] and ".system" in rejected[2]["reason"]
    assert events(run, "resume")[0]["checkpoint"].endswith(ckpts[2].name)
    assert_resumed_exactly(zero3_reference, run, 2)
