"""The real SmolLM2-135M-Instruct and its 36-layer LLaMA-Pro expansion served side by side: the
expanded model answers a chat request through Ray Serve and the `openai` client.

The expansion is the plain HF directory `llamapro expand` writes (export is its future successor);
identity is proven elsewhere, so it is skipped here (verify=False) to keep this test short."""

from __future__ import annotations

import pytest

from tests.integration.serve_conftest_helpers import free_port, local_ray, openai_client

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from llamapro.expansion import api as steps
    from llamapro.demo import ensure_demo_model
    from llamapro.serve import deploy, serve_config_from_dict

    base = ensure_demo_model()
    expanded = tmp_path_factory.mktemp("smol") / "expanded"
    steps.expand(str(base), str(expanded), blocks=6, strategy="even", verify=False, progress=False)
    port = free_port()
    model = {"num_cpus": 1, "torch_threads": 1, "max_batch_size": 4}
    cfg = serve_config_from_dict({
        "app_name": "lp-e2e", "port": port,
        "models": {"base": {"path": str(base), **model}, "expanded": {"path": str(expanded), **model}},
        "canary": {"weights": {"base": 0.5, "expanded": 0.5}, "seed": 0}})
    with local_ray(num_cpus=4):
        deploy(cfg, wait_s=600)
        yield port


def test_expanded_model_answers_a_chat_request(served):
    client = openai_client(served, api_key="none", timeout=300)
    r = client.chat.completions.create(model="expanded", messages=QUESTION, max_tokens=24,
                                       temperature=0)
    assert r.model == "expanded"
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # it ends its answer itself
    # an identity expansion answers exactly like its base (greedy, fp32)
    b = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, temperature=0)
    assert b.choices[0].message.content == r.choices[0].message.content


def test_expanded_model_streams(served):
    client = openai_client(served, api_key="none", timeout=300)
    chunks = list(client.chat.completions.create(model="expanded", messages=QUESTION, max_tokens=24,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
