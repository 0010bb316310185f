"""Expansion packs served on one base: real Ray Serve, real HTTP, the real `openai` client.

One app: the model ``base`` (a tiny random Llama with SmolLM2's tokenizer) declares the pack
``debian`` (the base expanded by one block, that block then changed as training would change it,
packed with ``llamapro pack``). One replica holds the base once and answers ``base`` exactly as the
base model does and ``debian`` exactly as the trained model does (same greedy tokens as
transformers' own ``generate`` on each), with rows of both in one running batch. The pack is loaded
on its first request through Ray Serve's model multiplexing.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.integration.serve_conftest_helpers import free_port, local_ray, make_tiny_chat_model, openai_client

pytestmark = pytest.mark.integration

APP = "lp-serve-packs"
PROMPTS = ["The capital of France is", "Once upon a time", "def main():", "Hello there, how"]
TOKENS = 48


def make_pack_of(base: Path, root: Path, name: str, seed: int, **expand) -> tuple[Path, Path]:
    """(pack directory, the trained model it came from): ``base`` expanded, its new blocks moved
    off the identity (what training does), packed."""
    import torch
    from safetensors.torch import load_file, save_file

    from llamapro.artifacts import write_metadata
    from llamapro.expansion import api as steps
    from llamapro.publish.pack import make_pack

    trained = root / f"trained-{name}"
    steps.expand(str(base), str(trained), verify=False, progress=False, **expand)
    meta = json.loads((trained / "llamapro.json").read_text())
    f = trained / "model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for k in sd:
        parts = k.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) in meta["new_layer_indices"]:
            sd[k] = sd[k] + torch.randn(sd[k].shape, generator=g) * 0.5
    save_file(sd, f, metadata={"format": "pt"})
    meta["kind"] = "trained"
    write_metadata(trained, meta)
    make_pack(str(trained), str(root / name), name=name)
    return root / name, trained


def greedy(model_dir: Path, prompts: list[str], tokens: int) -> list[str]:
    """transformers' own greedy generate, one prompt at a time: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            ids = m.generate(**enc, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:]
            out.append(tok.decode(ids, skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def packs_app(tmp_path_factory):
    from llamapro.serve import deploy, serve_config_from_dict

    d = tmp_path_factory.mktemp("serve-packs")
    base = make_tiny_chat_model(d / "base", seed=3, layers=2)
    pack, trained = make_pack_of(base, d, "debian", seed=11, blocks=1, strategy="even")
    ref = {"base": greedy(base, PROMPTS, TOKENS), "debian": greedy(trained, PROMPTS, TOKENS)}
    assert ref["base"] != ref["debian"]  # else the test could not tell the pack from the base
    port = free_port()
    cfg = serve_config_from_dict({
        "app_name": APP, "port": port,
        "models": {"base": {"path": str(base), "packs": {"debian": str(pack)}, "num_cpus": 0.5,
                            "torch_threads": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.05}},
        "canary": {"weights": {"base": 0.5, "debian": 0.5}, "seed": 7},
        "limits": {"max_tokens": 200},
    })
    with local_ray(num_cpus=2):
        deploy(cfg, wait_s=300)
        yield {"port": port, "ref": ref, "url": f"http://127.0.0.1:{port}", "base": base,
               "pack": pack}


def test_one_replica_answers_base_as_the_base_and_the_pack_as_the_trained_model_in_one_batch(packs_app):
    from ray import serve

    from llamapro.serve import replica_counts

    client = openai_client(packs_app["port"], api_key="none")
    ref = packs_app["ref"]
    # the first request for the pack loads its blocks (Serve's multiplexed loader)
    first = client.completions.create(model="debian", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0)
    assert first.choices[0].text == ref["debian"][0] and first.model == "debian"

    def ask(job):
        name, i = job
        r = client.completions.with_raw_response.create(model=name, prompt=PROMPTS[i],
                                                        max_tokens=TOKENS, temperature=0)
        return name, i, r.parse(), r.headers

    jobs = [(n, i) for i in range(len(PROMPTS)) for n in ("base", "debian")]
    for attempt in range(3):  # the texts must match every time; sharing a batch is up to timing
        with ThreadPoolExecutor(len(jobs)) as pool:
            res = list(pool.map(ask, jobs))
        for name, i, c, _ in res:
            assert c.model == name
            assert c.choices[0].text == ref[name][i], (name, i)
        replicas = {h["x-llamapro-replica"] for *_, h in res}
        assert len(replicas) == 1
        if all(int(h["x-llamapro-batch-size"]) == len(jobs) for *_, h in res):
            break
    else:
        pytest.fail(f"base and pack rows never ran in one batch: {[h['x-llamapro-batch-size'] for *_, h in res]}")
    # one model deployment with one replica: no second copy of the model for the pack
    assert replica_counts(APP) == {"ingress": 1, "model-base": 1}
    mem = serve.get_deployment_handle("model-base", APP).memory.remote().result()
    assert mem["loaded_packs"] == ["debian"] and 0 < mem["pack_blocks_bytes"] < mem["weights_bytes"]


def test_pack_routing_listing_and_canary(packs_app):
    client = openai_client(packs_app["port"], api_key="none")
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "debian", "llamapro"]
    # the alias follows the canary weights over base and pack, each answered as itself
    seen = {}
    for i in range(8):
        c = client.completions.create(model="llamapro", prompt=PROMPTS[i % 4], max_tokens=8, temperature=0)
        seen[c.model] = seen.get(c.model, 0) + 1
        assert c.choices[0].text == packs_app["ref"][c.model][i % 4][:len(c.choices[0].text)]
    assert set(seen) == {"base", "debian"}
    # chat and streaming go through the pack too
    chunks = client.chat.completions.create(model="debian", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True)
    assert all(ch.model == "debian" for ch in chunks)
    r = requests.post(packs_app["url"] + "/v1/completions", json={"model": "ubuntu", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and "debian" in r.json()["error"]["message"]


def test_serve_packs_in_process_load_unload_and_foreign_base(tmp_path):
    """No Ray: the engine with packs loaded and dropped again; a pack for another base refused."""
    import torch

    from llamapro.publish.pack import PackError
    from llamapro.serve.engine import TransformersEngine
    from llamapro.serve.packs import ServePacks
    from llamapro.tensors import fingerprint

    base = make_tiny_chat_model(tmp_path / "base", seed=3, layers=2)
    other = make_tiny_chat_model(tmp_path / "other", seed=4, layers=2)
    pa, ta = make_pack_of(base, tmp_path, "a", seed=1, blocks=1, strategy="top")
    pb, tb = make_pack_of(base, tmp_path, "b", seed=2, blocks=2, strategy="even")
    eng = TransformersEngine(str(base), threads=1)
    with pytest.raises(PackError) as e:
        ServePacks(eng.model, other, {"a": str(pa)})
    assert fingerprint(base) in str(e.value) and fingerprint(other) in str(e.value)
    eng.packs = ServePacks(eng.model, base, {"a": str(pa), "b": str(pb)})
    assert eng.call(lambda e: e.packs.load("b")).result() == ["b"]
    assert eng.call(lambda e: e.packs.load("a")).result() == ["a", "b"]
    assert eng.model.config.num_hidden_layers == 5
    req = {"kind": "completion", "prompt": PROMPTS[1], "max_tokens": 12, "default_max_tokens": 12,
           "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None, "ignore_eos": False}

    def run(*names):
        ps = []
        for n in names:
            p = eng.prepare(req)
            p.pack = n
            ps.append(p)
        return [o["text"] for o in eng.generate(ps)]

    want = {"": greedy(base, PROMPTS[1:2], 12)[0], "a": greedy(ta, PROMPTS[1:2], 12)[0],
            "b": greedy(tb, PROMPTS[1:2], 12)[0]}
    assert run("", "a", "b") == [want[""], want["a"], want["b"]]
    # a pack that waiting rows still need stays; otherwise its blocks go and the base is back
    assert eng.call(lambda e: e.packs.unload("a", {"a"})).result() == ["a", "b"]
    assert eng.call(lambda e: e.packs.unload("a")).result() == ["b"]
    assert eng.call(lambda e: e.packs.unload("b")).result() == []
    assert eng.model.config.num_hidden_layers == 2 and eng.packs.block_bytes() == 0
    assert len(list(eng.model.model.layers)) == 2
    assert run("") == [want[""]]
    with torch.no_grad():
        assert not eng.packs.blocks


def test_serve_config_packs_are_checked():
    from llamapro.config import ConfigError
    from llamapro.serve import serve_config_from_dict

    ok = serve_config_from_dict({"models": {"base": {"path": "m", "packs": {"debian": "p"}}},
                                 "canary": {"weights": {"base": 0.9, "debian": 0.1}}})
    assert ok.routes() == {"base": ("base", ""), "debian": ("base", "debian")}
    assert ok.weights() == pytest.approx({"base": 0.9, "debian": 0.1})
    for bad, msg in [
        ({"models": {"base": {"path": "m", "packs": {"llamapro": "p"}}}}, "taken"),
        ({"models": {"base": {"path": "m", "packs": {"x": "p"}}, "x": {"path": "m"}}}, "taken"),
        ({"models": {"base": {"path": "m", "engine": "vllm", "packs": {"x": "p"}}}}, "transformers"),
        ({"models": {"base": {"path": "m", "packs": {"bad name": "p"}}}}, "pack names"),
        ({"models": {"base": {"path": "m", "packs": ["p"]}}}, "mapping"),
        ({"models": {"base": {"path": "m", "packs": {"x": "p"}}}, "canary": {"weights": {"y": 1}}},
         "models and packs are base, x"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            serve_config_from_dict(bad)
