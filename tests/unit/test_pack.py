"""Expansion packs on tiny models of several families: pack -> apply gives the trained model,
packs for another base are refused, stacked packs strip one at a time, generation 2 grows on a
trained generation 1; and the proof gate on training (issue: unproven expansions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamapro.expansion import api as steps
from llamapro.artifacts import write_metadata
from llamapro.errors import CheckpointError
from llamapro.tensors import content_digest, fingerprint, read_config
from llamapro.cli import main
from llamapro.publish.pack import PackError, apply_packs, load_packs_into, make_pack, read_pack, strip_pack
from tests.tiny_models import tiny_model


def _train_new_blocks(d: Path, seed: int) -> None:
    """Stand-in for training (the real one is in tests/integration/test_grow_twice.py): random
    values in every tensor of the new blocks, originals untouched; metadata as training writes it."""
    meta = json.loads((d / "llamapro.json").read_text())
    f = d / "model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for k in sd:
        parts = k.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) in meta["new_layer_indices"]:
            sd[k] = torch.randn(sd[k].shape, generator=g).to(sd[k].dtype) * 0.1
    save_file(sd, f, metadata={"format": "pt"})
    meta["kind"] = "trained"
    meta["training"] = {"mode": "llamapro", "steps": 1, "originals_frozen": True}
    write_metadata(d, meta)


def _same_model(a: Path, b: Path) -> None:
    assert content_digest(a) == content_digest(b)
    ca, cb = read_config(a), read_config(b)
    for c in (ca, cb):
        c.pop("transformers_version", None)
    assert ca == cb


def _logits(d, ids, skip=None):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("packs")


def _base(root: Path, family: str, seed: int = 0) -> Path:
    d = root / f"base-{family}-{seed}"
    if not d.exists():
        tiny_model(family, seed=seed).save_pretrained(d)
    return d


def _trained(root: Path, base: Path, name: str, seed: int, **kw) -> Path:
    d = root / name
    # the identity proof has its own tests; here it would only cost time
    steps.expand(str(base), str(d), progress=False, verify=False, **kw)
    _train_new_blocks(d, seed)
    return d


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "qwen2_moe", "phi"])
def test_pack_then_apply_gives_the_trained_model(family, root):
    base = _base(root, family)
    trained = _trained(root, base, f"t-{family}", 1, blocks=2, strategy="even")
    res = make_pack(str(trained), str(root / f"p-{family}"))
    pack = read_pack(root / f"p-{family}")
    assert res["positions"] == [2, 5] and pack.info["base"]["fingerprint"] == fingerprint(base)
    assert (root / f"p-{family}" / "README.md").read_text().count(pack.info["base"]["fingerprint"]) == 1
    # the pack holds only the new blocks
    blocks = load_file(root / f"p-{family}" / "blocks.safetensors")
    assert {k.split(".")[2] for k in blocks} == {"2", "5"}
    out = apply_packs(str(base), [str(root / f"p-{family}")], str(root / f"a-{family}"))
    assert out["verification"]["ok"] and out["equals_trained_model"]
    _same_model(root / f"a-{family}", trained)
    assert fingerprint(root / f"a-{family}") == fingerprint(trained)
    # plain strip of the applied model gives the base back bit for bit
    r = steps.strip(str(root / f"a-{family}"), str(root / f"s-{family}"), progress=False)
    assert r["equals_base"]
    assert content_digest(root / f"s-{family}") == content_digest(base)


def test_pack_for_another_base_is_refused_naming_both_fingerprints(root):
    a, b = _base(root, "llama", 0), _base(root, "llama", 7)
    trained = _trained(root, a, "t-other", 2, blocks=1, strategy="top")
    make_pack(str(trained), str(root / "p-other"))
    fa, fb = fingerprint(a), fingerprint(b)
    with pytest.raises(PackError) as e:
        apply_packs(str(b), [str(root / "p-other")], str(root / "never"))
    assert fa in str(e.value) and fb in str(e.value) and "same config" in str(e.value)
    assert not (root / "never").exists() and not list(root.glob(".never.tmp-*"))
    # the CLI: exit 2, the same message
    assert main(["apply", str(b), str(root / "p-other"), str(root / "never")]) == 2
    assert not (root / "never").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_two_packs_stack_and_either_strips_back_bit_for_bit(family, root, capsys):
    base = _base(root, family)
    ta = _trained(root, base, f"ta-{family}", 3, blocks=2, strategy="even")
    tb = _trained(root, base, f"tb-{family}", 4, blocks=1, strategy="top")
    pa, pb = root / f"math-{family}", root / f"med-{family}"
    make_pack(str(ta), str(pa))
    make_pack(str(tb), str(pb))
    ab = root / f"ab-{family}"
    assert main(["apply", str(base), str(pa), str(pb), str(ab), "-q"]) == 0
    meta = json.loads((ab / "llamapro.json").read_text())
    assert [p["name"] for p in meta["packs"]] == [pa.name, pb.name]
    assert [p["mode"] for p in meta["packs"]] == ["stacked", "sibling"]
    assert meta["packs"][0]["positions"] == [2, 5] and meta["packs"][1]["positions"] == [6]
    assert meta["verification"]["ok"] and meta["num_layers"] == 7
    # each pack alone, for reference
    apply_packs(str(base), [str(pa)], str(root / f"a-only-{family}"))
    apply_packs(str(base), [str(pb)], str(root / f"b-only-{family}"))
    _same_model(root / f"a-only-{family}", ta)
    _same_model(root / f"b-only-{family}", tb)
    # remove the FIRST pack: exactly the model with only the second
    assert main(["strip", str(ab), str(root / f"ab-a-{family}"), "--pack", pa.name, "-q"]) == 0
    _same_model(root / f"ab-a-{family}", root / f"b-only-{family}")
    # remove the second (by stack position)
    strip_pack(str(ab), str(root / f"ab-b-{family}"), "1")
    _same_model(root / f"ab-b-{family}", root / f"a-only-{family}")
    # all of them: the base
    assert steps.strip(str(ab), str(root / f"ab-0-{family}"), progress=False)["equals_base"]
    # the stacked model computes each pack's model with the other's blocks skipped
    from transformers import AutoModelForCausalLM

    from llamapro.expansion.surgery import skip_layers

    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    m = AutoModelForCausalLM.from_pretrained(ab, dtype=torch.float32).eval()
    with torch.no_grad(), skip_layers(m, [6]):
        assert torch.equal(m(ids).logits, _logits(ta, ids))
    with torch.no_grad(), skip_layers(m, [2, 5, 6]):
        assert torch.equal(m(ids).logits, _logits(base, ids))
    with pytest.raises(PackError, match="no pack 'nope'.*" + pa.name):
        strip_pack(str(ab), str(root / "x"), "nope")


def test_generation_two_on_a_trained_generation_one(root):
    base = _base(root, "qwen2")
    t1 = _trained(root, base, "g1", 5, blocks=2, strategy="even")
    meta2 = steps.expand(str(t1), str(root / "g2"), blocks=1, strategy="top", progress=False)  # proven
    assert meta2["generation"] == 2 and meta2["verification"]["ok"]
    assert meta2["new_layer_indices"] == [6]  # only generation 2 trains
    gens = meta2["generations"]
    assert [g["generation"] for g in gens] == [1, 2]
    assert gens[0]["new_layer_indices"] == [2, 5] and gens[0]["training"]["mode"] == "llamapro"
    assert gens[0]["base_fingerprint"] == fingerprint(base)
    assert meta2["frozen_layer_indices"] == [2, 5]
    assert meta2["base"]["fingerprint"] == fingerprint(t1)
    _train_new_blocks(root / "g2", 6)
    make_pack(str(t1), str(root / "p-g1"))
    make_pack(str(root / "g2"), str(root / "p-g2"))
    assert read_pack(root / "p-g2").info["lineage"]["generation"] == 2
    # the generation-2 pack alone does not fit the base: it was made for generation 1's model
    with pytest.raises(PackError, match=fingerprint(t1)):
        apply_packs(str(base), [str(root / "p-g2")], str(root / "never"))
    res = apply_packs(str(base), [str(root / "p-g1"), str(root / "p-g2")], str(root / "g12"))
    assert [p["mode"] for p in res["packs"]] == ["stacked", "stacked"] and res["equals_trained_model"]
    _same_model(root / "g12", root / "g2")
    # generation 1 cannot be pulled out from under generation 2; generation 2 can go
    with pytest.raises(PackError, match="grown on top"):
        strip_pack(str(root / "g12"), str(root / "x"), "p-g1")
    strip_pack(str(root / "g12"), str(root / "g1-again"), "p-g2")
    _same_model(root / "g1-again", t1)


def test_in_memory_one_base_several_packs(root):
    from transformers import AutoModelForCausalLM

    from llamapro.expansion.surgery import skip_layers

    base = _base(root, "llama")
    ta = _trained(root, base, "mem-a", 8, blocks=2, strategy="even")
    tb = _trained(root, base, "mem-b", 9, blocks=1, strategy="bottom")
    make_pack(str(ta), str(root / "mem-pa"))
    make_pack(str(tb), str(root / "mem-pb"))
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    packed = load_packs_into(m, base, [root / "mem-pa", root / "mem-pb"])
    assert packed.names == ["base", "mem-pa", "mem-pb"]
    assert m.config.num_hidden_layers == 7
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    for name, ref in (("base", base), ("mem-pa", ta), ("mem-pb", tb)):
        with torch.no_grad(), skip_layers(m, packed.skip_for(name)):
            assert torch.equal(m(ids).logits, _logits(ref, ids)), name
    # all packs at once: the applied model
    apply_packs(str(base), [str(root / "mem-pa"), str(root / "mem-pb")], str(root / "mem-ab"))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, _logits(root / "mem-ab", ids))
    with pytest.raises(PackError, match="no pack 'x' is loaded"):
        packed.skip_for("x")


def test_pack_refuses_a_model_whose_originals_changed(root):
    base = _base(root, "llama")
    t = _trained(root, base, "norms", 10, blocks=1, strategy="top")
    sd = load_file(t / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    save_file(sd, t / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PackError, match="not its base.*llamapro export"):
        make_pack(str(t), str(root / "p-norms"))
    assert not (root / "p-norms").exists()


def test_bad_pack_inputs(root):
    base = _base(root, "llama")
    with pytest.raises(PackError, match="not a llamapro pack"):
        apply_packs(str(base), [str(base)], str(root / "never"))
    with pytest.raises(CheckpointError, match="no llamapro.json"):
        make_pack(str(base), str(root / "never"))
    t = _trained(root, base, "bad", 11, blocks=1, strategy="top")
    make_pack(str(t), str(root / "p-bad"))
    with pytest.raises(PackError, match="more than once"):
        apply_packs(str(base), [str(root / "p-bad"), str(root / "p-bad")], str(root / "never"))
    # OUT exists: refused without --force, the old one kept
    (root / "taken").mkdir()
    (root / "taken" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        apply_packs(str(base), [str(root / "p-bad")], str(root / "taken"))
    with pytest.raises(CheckpointError, match="already exists"):
        make_pack(str(t), str(root / "taken"))
    assert (root / "taken" / "keep").read_text() == "x"
    # a damaged pack: positions disagree with the blocks
    info = json.loads((root / "p-bad" / "pack.json").read_text())
    info["positions"] = [0]
    (root / "p-bad" / "pack.json").write_text(json.dumps(info))
    with pytest.raises(PackError, match="damaged"):
        apply_packs(str(base), [str(root / "p-bad")], str(root / "never"))
    assert not (root / "never").exists()


# --- the proof gate (issue: unproven expansions) --------------------------------------------------

def test_require_proven():
    ok = {"new_layer_indices": [1], "verification": {"ok": True}}
    steps.require_proven(ok)
    steps.require_proven({"new_layer_indices": []})  # a base: nothing to prove
    for v, why in ((None, "never ran"), ({"ok": False, "max_abs_logit_diff": 0.3}, "FAILED"),
                   ({"ok": False, "status": "unproven", "reason": "too big"}, "skipped.*too big")):
        meta = {"new_layer_indices": [1], "verification": v}
        with pytest.raises(steps.UnprovenError, match=why + ".*--allow-unproven.*train.allow_unproven"):
            steps.require_proven(meta)
        steps.require_proven(meta, allow_unproven=True)
    with pytest.raises(steps.UnprovenError):
        steps.require_proven({"new_layer_indices": [1]})  # no key at all


def test_failed_proof_with_force_keeps_the_good_output(root):
    base = _base(root, "llama")
    out = root / "good"
    steps.expand(str(base), str(out), blocks=1, progress=False)
    before = content_digest(out), (out / "llamapro.json").read_text()
    with pytest.raises(steps.IdentityError):
        steps.expand(str(base), str(out), blocks=1, progress=False, force=True,
                     residual_writers=["self_attn.o_proj"])  # the MLP still writes: not an identity
    assert (content_digest(out), (out / "llamapro.json").read_text()) == before
    assert not list(root.glob(".good.tmp-*"))


def test_too_large_or_unverified_is_marked_unproven(root):
    base = _base(root, "llama")
    meta = steps.expand(str(base), str(root / "big"), blocks=1, progress=False, verify_max_gb=1e-9)
    v = meta["verification"]
    assert v["ok"] is False and v["status"] == "unproven" and "verify_max_gb" in v["reason"]
    assert json.loads((root / "big" / "llamapro.json").read_text())["verification"] == v
    with pytest.raises(steps.UnprovenError, match="skipped"):
        steps.require_proven(meta)
    assert "UNPROVEN" in steps.summary(meta)
    meta = steps.expand(str(base), str(root / "nov"), blocks=1, progress=False, verify=False)
    assert meta["verification"]["status"] == "unproven" and meta["verification"]["reason"] == "--no-verify"
    # proving it later lifts the refusal
    steps.require_proven(steps.verify_checkpoint(str(root / "nov"), progress=False))


def test_train_refuses_an_unproven_expansion_before_starting_anything(root, monkeypatch):
    from llamapro import pipeline
    from llamapro.config import load_config

    base = _base(root, "llama")
    rd = root / "runs"
    cfg = load_config(None, [f"model.base={base}", f"run.output_dir={rd}", "run.name=u"])
    steps.expand(str(base), str(rd / "u" / "expanded"), blocks=1, progress=False, verify=False)
    started = []
    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a, **k: started.append(1))
    with pytest.raises(steps.UnprovenError, match="--allow-unproven"):
        pipeline.train_step(cfg)
    assert not started
    # the CLI flag reaches the config
    from llamapro.cli import build_parser

    a = build_parser().parse_args(["train", "--config", "x.yaml", "--allow-unproven"])
    assert a.allow_unproven
