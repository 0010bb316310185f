"""The Ray Serve LLM (vLLM) path: what can be checked without a GPU here, and the real thing
where a GPU and vLLM are present."""

from __future__ import annotations

import pytest
import torch
from fastapi import HTTPException
from starlette.requests import Request

from llamapro.serve.llm import (Limits, ServeLLMError, _check_request, build_llm_app, gpu_llm_available,
                                llm_config)

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


def test_key_and_limits_are_enforced_in_front(monkeypatch):
    monkeypatch.setenv("H3_TEST_KEY", "s3cret")
    lim = Limits(max_tokens=32, max_prompt_chars=10)
    _check_request(Body(), _request("Bearer s3cret"), "H3_TEST_KEY", lim)
    long_prompt = Body(messages=[{"content": "x" * 11}])
    for req, body, code, msg in [(_request(), Body(), 401, "API key"),
                                 (_request("Bearer nope"), Body(), 401, "API key"),
                                 (_request("Bearer s3cret"), Body(max_tokens=64), 400, "max_tokens 64"),
                                 (_request("Bearer s3cret"), long_prompt, 400, "11 characters")]:
        with pytest.raises(HTTPException) as e:
            _check_request(body, req, "H3_TEST_KEY", lim)
        assert e.value.status_code == code and msg in e.value.detail


@pytest.mark.skipif(GPU_LLM, reason="this machine has a GPU and vLLM: the refusal is for machines without")
def test_refuses_clearly_without_gpu_and_vllm(tmp_path):
    with pytest.raises(ServeLLMError, match="needs a GPU and vLLM"):
        build_llm_app({"demo": tmp_path})


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
