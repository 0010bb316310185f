"""The foundation modules: typed artifacts round trip, the run locator, ensure_ray's choice of
cluster (with a stand-in ray module: nothing starts), and the dtype policy of the loader."""

import json
import sys
import types

import pytest

from llamapro.artifacts import (
    ExpansionMetadata,
    RunLayout,
    locate,
    read_metadata,
    read_results,
    require_metadata,
    write_metadata,
    write_results,
)
from llamapro.errors import CheckpointError


def test_metadata_round_trip_keeps_unknown_keys_and_types_known_ones(tmp_path):
    meta = {"version": 1, "kind": "expanded", "new_layer_indices": [2, 5], "future_key": {"x": 1},
            "base": {"path": "/b", "fingerprint": "sha256:ab", "extra": 3},
            "training": {"mode": "lora", "steps": 7}}
    write_metadata(tmp_path, meta)
    got = read_metadata(tmp_path)
    assert isinstance(got, ExpansionMetadata) and got == meta
    assert got.new_layer_indices == [2, 5] and got.kind == "expanded"
    assert got.base.fingerprint == got.base_fingerprint == "sha256:ab" and got.base_path == "/b"
    assert got.training.mode == "lora" and got.training.steps == 7
    assert got.verification is None and got.proven is False
    assert got.generations == [] and got.frozen_layer_indices == []
    got.training["tokens"] = 10  # a change through the typed view lands in the record
    got.generation = 2
    write_metadata(tmp_path, got)
    again = json.loads((tmp_path / "llamapro.json").read_text())
    assert again["training"] == {"mode": "lora", "steps": 7, "tokens": 10}
    assert again["generation"] == 2 and again["future_key"] == {"x": 1} and again["base"]["extra"] == 3


def test_list_defaults_are_fresh(tmp_path):
    a, b = ExpansionMetadata(), ExpansionMetadata()
    a.new_layer_indices.append(1)
    assert b.new_layer_indices == [] and "new_layer_indices" not in a


def test_require_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="not produced by `llamapro expand`"):
        require_metadata(tmp_path)
    write_metadata(tmp_path, {"version": 99})
    with pytest.raises(CheckpointError, match="unsupported metadata version 99"):
        require_metadata(tmp_path)
    (tmp_path / "llamapro.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_metadata(tmp_path)


def test_results_round_trip(tmp_path):
    layout = RunLayout(tmp_path)
    write_results(layout.eval, {"version": 1, "gate": {"passed": True}, "other": 1})
    for where in (tmp_path, layout.eval):
        r = read_results(where)
        assert r.gate == {"passed": True} and r["other"] == 1 and r.battery is None
    assert read_results(tmp_path / "nowhere") is None
    assert layout.eval_results.is_file() and layout.baseline("lora").model == tmp_path / "baseline-lora" / "model"


def test_locate_a_run_a_checkpoint_and_an_adapter(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    assert tuple(locate(run)) == (run, run / "model")
    assert tuple(locate(run / "model")) == (None, run / "model")
    (run / "metrics.jsonl").write_text("")
    assert tuple(locate(run / "model")) == (run, run / "model")
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        locate(ad)
    assert locate(ad, adapters=True).checkpoint == ad


class _FakeRay(types.ModuleType):
    def __init__(self):
        super().__init__("ray")
        self.calls, self.up = [], False
        self.data = types.SimpleNamespace(DataContext=types.SimpleNamespace(
            get_current=lambda: self.ctx))
        self.ctx = types.SimpleNamespace(enable_progress_bars=True, print_on_execution_start=True)

    def is_initialized(self):
        return self.up

    def init(self, **kw):
        self.calls.append(kw)
        self.up = True


@pytest.fixture
def fake_ray(monkeypatch):
    ray = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray


def test_ensure_ray_starts_a_local_cluster_with_what_it_is_given(fake_ray):
    from llamapro.runtime import ensure_ray

    assert ensure_ray("data", num_cpus=6, include_dashboard=False, log_to_driver=False) is True
    assert fake_ray.calls == [{"num_cpus": 6, "include_dashboard": False, "log_to_driver": False}]
    assert ensure_ray("again", num_cpus=1) is False and len(fake_ray.calls) == 1


def test_ensure_ray_joins_the_jobs_cluster(fake_ray, monkeypatch):
    from llamapro.runtime import ensure_ray

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ensure_ray("eval", num_cpus=6, resources={"x": 1}, include_dashboard=False,
                      log_to_driver=False, quiet_data=True) is True
    assert fake_ray.calls == [{"log_to_driver": False}]  # ray.init reads RAY_ADDRESS itself
    assert fake_ray.ctx.enable_progress_bars is False and fake_ray.ctx.print_on_execution_start is False


def test_ensure_ray_local_and_explicit_addresses(fake_ray, monkeypatch):
    from llamapro.runtime import ensure_ray

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ensure_ray("serve", address="local", num_cpus=2, namespace="serve", include_dashboard=False,
               _system_config={"worker_niceness": 0})
    assert fake_ray.calls[-1] == {"address": "local", "num_cpus": 2, "namespace": "serve",
                                  "include_dashboard": False, "log_to_driver": True,
                                  "_system_config": {"worker_niceness": 0}}
    fake_ray.up = False
    ensure_ray("serve", address="ray://head:10001", namespace="serve", num_cpus=2)
    assert fake_ray.calls[-1] == {"address": "ray://head:10001", "namespace": "serve", "log_to_driver": True}


def test_dtype_policy():
    torch = pytest.importorskip("torch")
    from llamapro.loading import torch_dtype

    assert torch_dtype("auto", cuda=True) is torch.bfloat16
    assert torch_dtype("auto", cuda=False) is torch.float32
    assert torch_dtype("stored") == "auto"
    assert torch_dtype("float16") is torch.float16 and torch_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        torch_dtype("float13")


def test_the_loader_reads_only_safetensors(tmp_path):
    from llamapro.loading import load_model

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="reads weights only from safetensors"):
        load_model(tmp_path)
