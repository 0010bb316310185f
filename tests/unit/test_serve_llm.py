"""The Ray Serve LLM (vLLM) path: what can be checked without a GPU here, and the real thing
where a GPU and vLLM are present."""

from __future__ import annotations

import pytest
import torch
from fastapi import HTTPException
from starlette.requests import Request

from llamapro.config.serve import serve_config_from_dict
from llamapro.errors import ConfigError
from llamapro.serve.auth import key_digest
from llamapro.serve.llm import (
    Limits,
    Router,
    ServeLLMError,
    _check_request,
    app_from_serve_config,
    build_llm_app,
    gpu_llm_available,
    llm_app_args,
    llm_config,
)

GPU_LLM, WHY = gpu_llm_available()


def _request(auth: str | None = None) -> Request:
    headers = [(b"authorization", auth.encode())] if auth else []
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers})


class Body:  # the two fields _check_request reads from an OpenAI request
    def __init__(self, max_tokens=16, messages=None, model="stable"):
        self.max_tokens, self.messages, self.model = max_tokens, messages or [{"role": "user", "content": "hi"}], model


def test_llm_config_points_vllm_at_the_export(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = llm_config("demo", tmp_path, max_model_len=2048, engine_kwargs={"dtype": "bfloat16"})
    assert cfg["model_loading_config"] == {"model_id": "demo", "model_source": str(tmp_path.resolve())}
    assert cfg["engine_kwargs"] == {"max_model_len": 2048, "max_num_seqs": 64, "dtype": "bfloat16"}
    with pytest.raises(ServeLLMError, match="no config.json"):
        llm_config("x", tmp_path / "missing")


def test_key_and_limits_are_enforced_in_front():
    lim = Limits(max_tokens=32, max_prompt_chars=10)
    key = key_digest("s3cret")
    _check_request(Body(), _request("Bearer s3cret"), key, lim)
    _check_request(Body(), _request(), None, lim)  # no key configured: no key needed
    long_prompt = Body(messages=[{"content": "x" * 11}])
    for req, body, code, msg in [(_request(), Body(), 401, "API key"),
                                 (_request("Bearer nope"), Body(), 401, "API key"),
                                 (_request("Bearer s3cret"), Body(max_tokens=64), 400, "max_tokens 64"),
                                 (_request("Bearer s3cret"), long_prompt, 400, "11 characters")]:
        with pytest.raises(HTTPException) as e:
            _check_request(body, req, key, lim)
        assert e.value.status_code == code and msg in e.value.detail


@pytest.mark.skipif(GPU_LLM, reason="this machine has a GPU and vLLM: the refusal is for machines without")
def test_refuses_clearly_without_gpu_and_vllm(tmp_path):
    with pytest.raises(ServeLLMError, match="needs a GPU and vLLM"):
        build_llm_app({"demo": tmp_path})
    (tmp_path / "config.json").write_text("{}")
    cfg = serve_config_from_dict({"engine": "ray-llm", "models": {"m": str(tmp_path)}})
    with pytest.raises(ServeLLMError) as e:
        app_from_serve_config(cfg)
    # names the key, why, and the fix
    assert "serve.engine=ray-llm" in str(e.value) and "needs a GPU and vLLM" in str(e.value)
    assert "serve.engine: llamapro" in str(e.value)


def _model_dir(p):
    p.mkdir()
    (p / "config.json").write_text("{}")
    return str(p)


def test_serve_engine_ray_llm_maps_the_serve_section(tmp_path):
    """serve.engine: ray-llm is a validated key, and each model's serve keys become its LLMConfig."""
    cfg = serve_config_from_dict({
        "engine": "ray-llm", "api_key_env": "LLAMAPRO_API_KEY", "served_model_name": "any",
        "limits": {"max_tokens": 64, "max_body_bytes": 4096},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "canary": {"weights": {"stable": 3, "candidate": 1}, "seed": 7},
        "models": {"stable": {"path": _model_dir(tmp_path / "a"), "max_context": 2048,
                              "max_batch_size": 16, "dtype": "bfloat16",
                              "vllm": {"gpu_memory_utilization": 0.8}},
                   "candidate": {"path": _model_dir(tmp_path / "b"),
                                 "autoscaling": {"max_replicas": 1}}}})
    args = llm_app_args(cfg)
    a, b = args["llm_configs"]
    assert a["model_loading_config"] == {"model_id": "stable", "model_source": str(tmp_path / "a")}
    assert a["engine_kwargs"] == {"max_model_len": 2048, "max_num_seqs": 16, "dtype": "bfloat16",
                                  "gpu_memory_utilization": 0.8}
    assert a["deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert b["engine_kwargs"] == {"max_num_seqs": 8}  # max_context 0: vLLM takes the model's own
    assert b["deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1}
    extra = args["ingress_extra_kwargs"]
    assert extra["api_key_env"] == "LLAMAPRO_API_KEY" and extra["api_key_file"] is None
    assert extra["limits"] == {"max_tokens": 64, "max_prompt_chars": 4096}
    assert extra["alias"] == "any" and extra["weights"] == {"stable": 0.75, "candidate": 0.25}
    assert serve_config_from_dict({"models": {"m": "demo:smollm2-135m-instruct"}}).engine == "llamapro"


@pytest.mark.parametrize("section,match", [
    ({"engine": "vllm-ray"}, r"serve.engine='vllm-ray': choose one of llamapro, ray-llm"),
    ({"engine": "ray-llm", "models": {"m": {"path": "x", "packs": {"p": "/p"}}}},
     r"serve.models.m.packs: serve.engine=ray-llm serves no packs"),
    ({"engine": "ray-llm", "models": {"m": {"path": "x", "engine": "transformers"}}},
     r"contradicts serve.engine=ray-llm.*serve.engine: llamapro"),
    ({"engine": "ray-llm", "models": {"m": {"path": "x", "device": "cpu"}}}, r"device cpu"),
])
def test_serve_engine_is_checked_at_load(section, match):
    with pytest.raises(ConfigError, match=match):
        serve_config_from_dict(section)


def test_router_sends_the_alias_by_weight_and_a_canary_fraction_to_the_candidate():
    r = Router(alias="any", weights={"a": 1, "b": 3, "c": 0}, seed=0)
    got = [r.route(Body(model="any")).model for _ in range(4000)]
    assert set(got) == {"a", "b"} and 0.70 < got.count("b") / len(got) < 0.80
    assert r.route(Body(model=None)).model in ("a", "b")  # no model: the alias
    assert r.route(Body(model="c")).model == "c"  # a named model keeps its name
    from llamapro.serve.llm import Canary

    c = Router(canary=Canary("stable", "cand", 0.25), seed=1)
    got = [c.route(Body(model="stable")).model for _ in range(4000)]
    assert 0.20 < got.count("cand") / len(got) < 0.30
    assert c.route(Body(model="other")).model == "other"


@pytest.mark.skipif(not GPU_LLM, reason="needs a GPU and vLLM")
def test_ray_serve_llm_serves_the_demo_with_key_and_canary(monkeypatch):
    from openai import AuthenticationError, OpenAI
    from ray import serve

    from llamapro.demo import ensure_demo_model

    monkeypatch.setenv("LLAMAPRO_TEST_KEY", "k")
    demo = ensure_demo_model()
    app = build_llm_app({"stable": demo, "candidate": demo}, canary=("stable", "candidate", 0.5),
                        api_key_env="LLAMAPRO_TEST_KEY", max_model_len=1024, max_num_seqs=8)
    serve.run(app, blocking=False)
    try:
        ok = OpenAI(base_url="http://localhost:8000/v1", api_key="k")
        r = ok.chat.completions.create(model="stable", max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        with pytest.raises(AuthenticationError):
            OpenAI(base_url="http://localhost:8000/v1", api_key="wrong").chat.completions.create(
                model="stable", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    finally:
        serve.shutdown()
        torch.cuda.empty_cache()
