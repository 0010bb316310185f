"""Every supported family expands into an exact identity, in memory and on disk."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llamapro.expansion import api as steps
from llamapro.expansion import structure
from llamapro.tensors import METADATA_FILE, content_digest, fingerprint
from llamapro.expansion.surgery import check_identity, expand_model, find_layers, skip_layers
from llamapro.expansion.strategies import plan
from tests.tiny_models import FAMILY_CONFIGS, REQUIRED_FAMILIES, tiny_model

CASES = [("even", 2), ("even", 3), ("top", 1), ("bottom", 2), ("middle", 5)]


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("strategy,n", CASES)
def test_in_memory_expansion_is_identity(family, strategy, n):
    base = tiny_model(family)
    model = copy.deepcopy(base)
    p = plan(4, n, strategy)
    res = expand_model(model, p)
    assert model.config.num_hidden_layers == 4 + n
    _, layers = find_layers(model)
    assert len(layers) == 4 + n
    for i, layer in enumerate(layers):  # KV-cache slots renumbered
        assert all(m.layer_idx == i for m in layer.modules() if hasattr(m, "layer_idx"))
    for key in ("layer_types", "mlp_only_layers"):
        val = getattr(model.config, key, None)
        if key == "layer_types" and isinstance(val, list):
            assert len(val) == 4 + n
            src = p.source_of()
            assert val == [base.config.layer_types[s] for s in src]
    rep = check_identity(model, p.new_indices, base=base, max_new_tokens=6)
    assert rep.max_abs_logit_diff <= 1e-5 and rep.generation_equal, (family, rep)
    assert rep.bit_identical
    # the zeroed writers really are zero, and everything else in a new block is a copy
    for j, s in p.new_sources().items():
        new = dict(layers[j].named_parameters())
        src = dict(base.get_submodule(find_layers(base)[0])[s].named_parameters())
        assert res.zeroed[j]
        for name in res.zeroed[j]:
            assert torch.count_nonzero(new[name]) == 0
        for name in set(new) - set(res.zeroed[j]):
            assert torch.equal(new[name], src[name])


def test_skip_layers_restores_the_model():
    base = tiny_model("qwen2")
    model = copy.deepcopy(base)
    p = plan(4, 2, "even")
    expand_model(model, p)
    ids = torch.randint(0, 128, (1, 9))
    with skip_layers(model, p.new_indices) as m:
        assert m.config.num_hidden_layers == 4 and len(m.config.layer_types) == 4
        assert torch.equal(m(ids).logits, base(ids).logits)
    assert model.config.num_hidden_layers == 6 and len(find_layers(model)[1]) == 6


@pytest.mark.parametrize("family", REQUIRED_FAMILIES + ["qwen3_moe", "starcoder2", "phi", "gpt_neox"])
def test_streaming_equals_in_memory_and_strip_round_trips(family, tmp_path):
    base = tiny_model(family)
    base.save_pretrained(tmp_path / "base")
    meta = steps.expand(str(tmp_path / "base"), str(tmp_path / "out"), blocks=3, strategy="even",
                        progress=False)
    # metadata: which layers are new, where they came from, the proof
    on_disk = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["new_layer_indices"] == [2, 4, 6] and meta["num_layers"] == 7
    assert meta["new_layer_sources"] == {"2": 1, "4": 2, "6": 3}
    assert meta["base"]["fingerprint"] == fingerprint(tmp_path / "base")
    assert meta["verification"]["ok"] and meta["verification"]["bit_identical_logits"]
    assert meta["structure_check"]["ok"] and meta["zero_bytes_checked"] > 0
    # the in-memory module path gives byte-identical tensors
    mem = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    expand_model(mem, plan(4, 3, "even"))
    mem.save_pretrained(tmp_path / "mem")
    a, b = {}, {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        a.update(load_file(f))
    for f in (tmp_path / "mem").glob("*.safetensors"):
        b.update(load_file(f))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k
    # plain transformers loads it; per-layer config lists match
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 7
    # rollback: strip gives the base's tensors and config back bit for bit
    res = steps.strip(str(tmp_path / "out"), str(tmp_path / "strip"), progress=False)
    assert res["equals_base"]
    assert content_digest(tmp_path / "strip") == content_digest(tmp_path / "base")


def test_tied_embeddings_stay_tied(tmp_path):
    base = tiny_model("gemma2")  # ties embeddings
    assert base.config.tie_word_embeddings
    base.save_pretrained(tmp_path / "base")
    steps.expand(str(tmp_path / "base"), str(tmp_path / "out"), blocks=1, strategy="top", progress=False)
    sd = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in sd
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_streams_shard_by_shard(tmp_path):
    base = tiny_model("llama", num_layers=6)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 2
    meta = steps.expand(str(tmp_path / "base"), str(tmp_path / "out"), blocks=2,
                        positions=[0, 7], progress=False)
    assert meta["strategy"] == "explicit" and meta["verification"]["ok"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "model.layers.7.mlp.down_proj.weight" in index["weight_map"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.config.num_hidden_layers == 8


def test_single_shard_with_index_keeps_its_index(tmp_path):
    """The Hub layout model-00001-of-00001.safetensors + index must stay loadable."""
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "model.safetensors").rename(tmp_path / "base" / "model-00001-of-00001.safetensors")
    keys = load_file(tmp_path / "base" / "model-00001-of-00001.safetensors").keys()
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    meta = steps.expand(str(tmp_path / "base"), str(tmp_path / "out"), blocks=1, progress=False)
    assert meta["verification"]["ok"]
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    res = steps.strip(str(tmp_path / "out"), str(tmp_path / "back"), progress=False)
    assert res["equals_base"] and (tmp_path / "back" / "model.safetensors.index.json").is_file()


def test_structure_check_in_a_child_process(monkeypatch, tmp_path):
    """What `llamapro expand` runs beside the copy when transformers is not yet imported."""
    monkeypatch.setenv("LLAMAPRO_CACHE", str(tmp_path))
    base = tiny_model("llama", num_layers=4).config.to_dict()
    p = plan(4, 2, "even")
    from llamapro.expansion.families import expand_config

    new, _ = expand_config(base, p)
    sources = {str(k): v for k, v in p.new_sources().items()}
    assert structure.check_structure_isolated(base, new, sources, isolate=True) == {
        "layers_checked": 6, "ok": True, "cached": False}
    wrong = {**new, "intermediate_size": new["intermediate_size"] * 2}  # every layer's MLP changes
    with pytest.raises(steps.CheckpointError, match="would not have the structure of base layer"):
        structure.check_structure_isolated(base, wrong, sources, isolate=True)
    with pytest.raises(steps.CheckpointError, match="could not build the model"):
        structure.check_structure_isolated(base, {**new, "model_type": "no-such-model"}, sources, isolate=True)


def test_zero_check_catches_a_nonzero_byte_in_a_new_block(tmp_path):
    from llamapro.artifacts import read_metadata
    from llamapro.errors import CheckpointError
    from llamapro.expansion.streaming import check_new_blocks_zero
    from llamapro.tensors import tensor_table

    tiny_model("llama", num_layers=2).save_pretrained(tmp_path / "base")
    meta = steps.expand(str(tmp_path / "base"), str(tmp_path / "out"), blocks=1, strategy="top",
                        verify=False, progress=False)
    meta = read_metadata(tmp_path / "out")
    zeroed = sum(t.nbytes for k, t in tensor_table(tmp_path / "out").items()
                 if k.startswith("model.layers.2.") and k.split("model.layers.2.")[1] in meta["zeroed_in_new_blocks"])
    assert zeroed and check_new_blocks_zero(tmp_path / "out", meta) == zeroed == meta["zero_bytes_checked"]
    t = tensor_table(tmp_path / "out")["model.layers.2.mlp.down_proj.weight"]
    with open(t.file, "r+b") as f:  # one byte in the middle of a zeroed projection (a hole or not)
        f.seek(t.start + t.nbytes // 2)
        f.write(b"\x01")
    with pytest.raises(CheckpointError, match="down_proj.weight is not zero"):
        check_new_blocks_zero(tmp_path / "out", meta)


def test_data_ranges_skip_holes(tmp_path):
    import os

    from llamapro.expansion.streaming import _data_ranges

    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.write(b"x" * 4096)
        fh.seek(4 << 20, os.SEEK_CUR)  # a 4 MiB hole
        fh.write(b"y" * 4096)
    fd = os.open(f, os.O_RDONLY)
    try:
        ranges = _data_ranges(fd, 0, f.stat().st_size)
        hole = _data_ranges(fd, 4096, 4096 + (4 << 20))
    finally:
        os.close(fd)
    assert ranges[0][0] == 0 and ranges[-1][1] == f.stat().st_size
    if len(ranges) == 2:  # the file system keeps holes (ext4, xfs, btrfs, tmpfs)
        assert hole == []
    else:  # it does not: everything is data and gets read back
        assert hole == [(4096, 4096 + (4 << 20))]


def _structure_inputs(layers=4, blocks=2, strategy="even"):
    from llamapro.expansion.families import expand_config

    base = tiny_model("llama", num_layers=layers).config.to_dict()
    p = plan(layers, blocks, strategy)
    new, _ = expand_config(base, p)
    return base, new, {str(k): v for k, v in p.new_sources().items()}


def test_a_passed_structure_check_is_remembered_under_everything_it_depends_on(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAPRO_CACHE", str(tmp_path))
    base, new, sources = _structure_inputs()
    first = structure.check_structure_isolated(base, new, sources)
    assert first == {"layers_checked": 6, "ok": True, "cached": False}
    entries = list((tmp_path / "structure").glob("*.json"))
    assert len(entries) == 1

    calls = []
    real = structure._check_structure_somewhere
    monkeypatch.setattr(structure, "_check_structure_somewhere", lambda *a: calls.append(a) or real(*a))
    assert structure.check_structure_isolated(base, new, sources) == {**first, "cached": True}
    assert calls == []  # answered from the cache: no transformers, no child

    # anything the answer depends on misses: other sources, another config, remote code
    b2, n2, s2 = _structure_inputs(strategy="top")
    assert structure.check_structure_isolated(b2, n2, s2)["cached"] is False and len(calls) == 1
    structure.check_structure_isolated(base, {**new, "rms_norm_eps": 1e-3}, sources)
    assert len(calls) == 2
    assert structure._structure_cache_file(base, new, sources, trust_remote_code=True) is None

    # a failure is never remembered
    wrong = {**new, "intermediate_size": new["intermediate_size"] * 2}
    for _ in range(2):
        with pytest.raises(steps.CheckpointError, match="would not have the structure"):
            structure.check_structure_isolated(base, wrong, sources)
    assert len(calls) == 4

    # a corrupt entry is ignored, checked again and rewritten
    entries[0].write_text("{not json")
    assert structure.check_structure_isolated(base, new, sources)["cached"] is False
    assert structure.check_structure_isolated(base, new, sources)["cached"] is True

    monkeypatch.setenv("LLAMAPRO_STRUCTURE_CACHE", "0")
    assert structure.check_structure_isolated(base, new, sources)["cached"] is False


def test_structure_cache_key_follows_the_transformers_code(monkeypatch, tmp_path):
    """An edited (or editable) transformers with an unchanged version must not hit."""
    import importlib.util
    import os
    import types

    pkg = tmp_path / "site" / "transformers"
    (pkg / "models" / "llama").mkdir(parents=True)
    modeling = pkg / "models" / "llama" / "modeling_llama.py"
    modeling.write_text("# v1\n")
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(
        submodule_search_locations=[str(pkg)]) if name == "transformers" else real_find(name, *a))
    base, new, sources = _structure_inputs()
    k1 = structure._structure_cache_file(base, new, sources, False)
    assert k1 == structure._structure_cache_file(base, new, sources, False)
    modeling.write_text("# v2, other layer rules\n")
    os.utime(modeling, ns=(1, 2))
    assert structure._structure_cache_file(base, new, sources, False) != k1
