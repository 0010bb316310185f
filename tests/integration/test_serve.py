"""The Serve app end to end: real Ray Serve, real HTTP, the real `openai` client, two tiny models.

One local cluster and one app for the module (a tiny random Llama with SmolLM2's tokenizer as
``base``, the same expanded by one LLaMA-Pro block as ``expanded``, and ``narrow``: base again with
queues small enough to overload). The canary switch and the autoscaling change are redeploys of the
config, exactly as `llamapro serve` (SIGHUP), `serve deploy` and KubeRay apply them; traffic runs
through both and no request may fail. The API key reaches the app as a Ray job passes it: an env var
of the deployer and of the runtime env it deploys with (never copied into the app config).

The fault catalogue of serving lives here and in test_serve_engine.py / test_serve_cli.py:
admission failure (engine), overload at 2x capacity, oversized and deeply nested bodies, wrong JSON
types, client disconnect mid-stream, a failing prompt among several, the key never in `serve status`,
the deployed config or the logs, SIGTERM (CLI).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.serve_conftest_helpers import (
    API_KEY,
    LoadDriver,
    free_port,
    local_ray,
    make_tiny_chat_model,
    openai_client,
)

pytestmark = pytest.mark.integration

APP = "lp-serve-test"
WEIGHTS = {"base": 0.75, "expanded": 0.25}
KEY_ENV = "LLAMAPRO_SERVE_TEST_KEY"
# What a Ray job started with `--runtime-env-json '{"env_vars": {...}}'` hands `jobs/serve.py`: the
# key among ordinary variables. Every deploy of the module passes the same runtime env.
RUNTIME_ENV = {"env_vars": {KEY_ENV: API_KEY, "LLAMAPRO_SERVE_TEST_FLAG": "visible"}}
NARROW = {"max_batch_size": 2, "max_ongoing_requests": 2, "max_queued_requests": 2,
          "retry_after_s": 3}
MAX_BODY = 65536


def make_config(port, base, expanded, keyfile=None, weights=WEIGHTS, base_autoscaling=None,
                limits=None):
    from llamapro.serve import serve_config_from_dict

    model = {"num_cpus": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": 0.02,
             "torch_threads": 1}
    return serve_config_from_dict({
        "app_name": APP, "port": port, "api_key_env": KEY_ENV,
        "models": {"base": {"path": str(base), **model,
                            **({"autoscaling": base_autoscaling} if base_autoscaling else {})},
                   "expanded": {"path": str(expanded), **model},
                   "narrow": {"path": str(base), **model, **NARROW}},
        "canary": {"weights": weights, "seed": 1234},
        "limits": {"max_tokens": 200, "default_max_tokens": 16, "max_body_bytes": MAX_BODY,
                   **(limits or {})},
    })


def redeploy(cfg, wait_s=120):
    from llamapro.serve import deploy

    return deploy(cfg, runtime_env=RUNTIME_ENV, wait_s=wait_s)


def model_stats(name="base") -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"model-{name}", APP).stats.remote().result()


def wait_stats(name, pred, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = model_stats(name)
        if pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from llamapro.expansion import api as steps

    d = tmp_path_factory.mktemp("serve")
    base = make_tiny_chat_model(d / "base", seed=0)
    expanded = d / "expanded"
    steps.expand(str(base), str(expanded), blocks=1, strategy="even", verify=False, progress=False)
    port = free_port()
    cfg = make_config(port, base, expanded)
    with local_ray(num_cpus=4):
        # Set after the cluster started: its processes do not inherit the key, so the ingress can
        # only have it the way deploy() hands it over (a digest), as on a remote cluster.
        os.environ[KEY_ENV] = API_KEY
        try:
            redeploy(cfg, wait_s=300)
            yield {"port": port, "cfg": cfg, "base": base, "expanded": expanded, "keyfile": None,
                   "url": f"http://127.0.0.1:{port}"}
        finally:
            os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server["port"])


def raw_post(server, path, data, key=API_KEY):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(server["url"] + path, data=data, headers=headers, timeout=60)


def chat(client, model="base", content="Say something.", **kw):
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=model, messages=[{"role": "user",
                                                                   "content": content}], **kw)


# --- the API ---------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"base", "expanded", "narrow", "llamapro"}
    r = requests.get(server["url"] + "/health", timeout=10)  # open: probes carry no key
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_completion(client):
    r = chat(client, "base", "What is the capital of France?", max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == "base"
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and 1 <= u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_completion_multi_prompt_and_max_tokens(client):
    r = client.completions.create(model="expanded", prompt=["Once upon a time", "The answer is"],
                                  max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "expanded"
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 10  # max_tokens honoured per prompt


def test_streaming_chat_equals_non_streaming(client):
    kw = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = chat(client, "base", "Tell me a story.", **kw)
    chunks = list(chat(client, "base", "Tell me a story.", stream=True,
                       stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.model == "base" for c in chunks)


def test_streaming_completion_raw_sse(server):
    r = requests.post(server["url"] + "/v1/completions", stream=True, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "expanded", "prompt": "Hello", "max_tokens": 6,
                            "stream": True, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible_even_when_batched(client):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True})
    one = chat(client, "base", "Pick a word.", seed=123, **kw).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:  # the same seeded request 4x at once: batched together
        many = list(pool.map(lambda _: chat(client, "base", "Pick a word.", seed=123, **kw)
                             .choices[0].message.content, range(4)))
    assert many == [one] * 4
    other = chat(client, "base", "Pick a word.", seed=124, **kw).choices[0].message.content
    assert other != one


def test_stop_strings(client):
    kw = dict(model="expanded", prompt="Numbers:", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 8, full
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.find(stop)]


def test_concurrent_requests_are_batched(client):
    def one(i):
        r = client.chat.completions.with_raw_response.create(
            model="base", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=16,
            temperature=0, extra_body={"ignore_eos": True})
        return int(r.headers["x-llamapro-batch-size"]), r.parse().usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, range(8)))
    assert all(n == 16 for _, n in out)  # per-request max_tokens honoured inside batches
    assert max(b for b, _ in out) > 1 and max(b for b, _ in out) <= 4  # max_batch_size=4


# --- auth and bad input ----------------------------------------------------------------------------

def test_api_key_is_required(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(server["port"], api_key="sk-wrong"))
    r = raw_post(server, "/v1/chat/completions", json.dumps({"model": "base", "messages": [
        {"role": "user", "content": "hi"}]}), key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(server["url"] + "/v1/models", timeout=10).status_code == 401


def test_bad_input_gives_openai_errors_and_the_server_keeps_serving(server, client):
    import openai

    r = raw_post(server, "/v1/chat/completions", b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = raw_post(server, "/v1/chat/completions", json.dumps({"model": "base"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="no-such-model")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # the tiny models' context is 256 tokens
        chat(client, content="word " * 400)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=201)  # cap is 200
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, temperature=3.0)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        chat(client, n=2)  # unsupported parameters are refused, not ignored
    assert chat(client).choices[0].message.content is not None


# --- fault catalogue -------------------------------------------------------------------------------

WRONG_TYPES = [  # (path, body, the param the 400 names)
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": 7, "content": "x"}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages[0].content"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [True, 3]}, "prompt"),
    ("/v1/completions", {"prompt": [-1, 3]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": 5}, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 30}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": -0.1}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": [1]}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": []}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "y"}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "x", "response_format": "json"}, "response_format"),
]


def test_wrong_json_types_and_deep_nesting_are_400s_never_500s(server, client):
    for path, body, param in WRONG_TYPES:
        r = raw_post(server, path, json.dumps(body))
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    for body in (b"[1, 2]", b'"text"', b"null", b"\xff\xfe", b'{"prompt": NaN}'):
        r = raw_post(server, "/v1/completions", body)
        assert r.status_code == 400, (body, r.status_code, r.text)
    deep = b'{"prompt": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"  # json.loads would recurse out
    r = raw_post(server, "/v1/completions", deep)
    assert r.status_code == 400 and "nests JSON deeper" in r.json()["error"]["message"]
    # top_p 0 is accepted (as OpenAI does) and means greedy: the temperature-0 text
    kw = dict(max_tokens=12, extra_body={"ignore_eos": True})
    assert (chat(client, top_p=0, temperature=1.0, **kw).choices[0].message.content
            == chat(client, temperature=0, **kw).choices[0].message.content)


def test_oversized_body_is_413_with_or_without_content_length(server, client):
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10), "max_tokens": 1}).encode()
    r = raw_post(server, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # chunked transfer: no Content-Length to refuse up front
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = requests.post(server["url"] + "/v1/completions", data=chunks(), timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}",
                               "Content-Type": "application/json"})
    assert r.status_code == 413
    assert chat(client).choices[0].message.content is not None  # and it keeps serving


def test_client_disconnect_mid_stream_takes_the_row_out_of_the_batch(server):
    before = model_stats("base")
    r = requests.post(server["url"] + "/v1/completions", stream=True, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "base", "prompt": "Tell", "max_tokens": 200, "stream": True,
                            "ignore_eos": True})
    events = (ln for ln in r.iter_lines() if ln)
    for _ in range(3):  # a few tokens have arrived: the row is generating
        assert next(events).startswith(b"data: {")
    assert model_stats("base")["running"] == 1
    r.close()  # the client goes away mid-stream
    st = wait_stats("base", lambda s: s["running"] == 0)
    assert st["running"] == 0, st
    assert st["cancelled"] == before["cancelled"] + 1 and st["finished"] == before["finished"], st


def test_a_failing_prompt_cancels_its_siblings(server):
    before = model_stats("base")
    r = raw_post(server, "/v1/completions", json.dumps({
        "model": "base", "prompt": ["Once upon a time", "word " * 400], "max_tokens": 200,
        "ignore_eos": True}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # The sibling (200 tokens to go, a second or so here) is cancelled, wherever it was: in the
    # batch (counted as cancelled) or not yet admitted (never reaches the engine). Either way it is
    # never generated to the end for nobody, and nothing of it is left running.
    time.sleep(2.0)
    st = wait_stats("base", lambda s: s["running"] == 0 and s["pending"] == 0)
    assert st["running"] == st["pending"] == 0, st
    assert st["finished"] == before["finished"], (before, st)
    assert st["cancelled"] - before["cancelled"] in (0, 1), (before, st)


def test_overload_at_twice_capacity_answers_503_with_retry_after_and_recovers(server):
    """``narrow`` holds 2 running + 2 queued requests per ingress replica; 8 clients (twice that)
    each send 3 requests at once. Every answer is a 200 or a 503 with Retry-After; none waits
    without bound, none is another 5xx; afterwards the model serves normally with nothing left."""
    capacity = NARROW["max_ongoing_requests"] + NARROW["max_queued_requests"]

    def one(_):
        r = requests.post(server["url"] + "/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "narrow", "prompt": "Load", "max_tokens": 100,
                                "ignore_eos": True})
        return r.status_code, r.headers.get("Retry-After"), r.json()

    with ThreadPoolExecutor(2 * capacity) as pool:
        out = list(pool.map(one, range(3 * 2 * capacity)))
    codes = Counter(c for c, _, _ in out)
    assert set(codes) <= {200, 503}, codes
    assert codes[503] >= 1 and codes[200] >= capacity, codes
    for code, retry, body in out:
        if code == 503:
            assert retry == str(NARROW["retry_after_s"]) and body["error"]["code"] == "overloaded"
    st = wait_stats("narrow", lambda s: s["running"] == 0 and s["pending"] == 0)
    assert st["running"] == st["pending"] == 0 and st["failed"] == 0, st
    code, _, body = one(0)
    assert code == 200 and body["usage"]["completion_tokens"] == 100


def test_api_key_never_in_serve_status_deployed_config_or_logs(server, client):
    """The key was in the deployer's environment and in the runtime env it deployed with (as a
    Ray job passes it). The ingress authenticates with it, yet it is nowhere in what `serve
    status` / the dashboard show (the controller's serve details, including the deployed app
    config) nor in any log file of the cluster."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    assert chat(client).choices[0].message.content is not None  # the ingress knows the key
    details = json.dumps(_get_global_client().get_serve_details(), default=str)
    assert "LLAMAPRO_SERVE_TEST_FLAG" in details  # the runtime env did reach the app config...
    assert API_KEY not in details  # ...without the key
    assert API_KEY not in str(serve.status())
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    scanned = 0
    for root, _, files in os.walk(logs):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert API_KEY.encode() not in fh.read(), os.path.join(root, f)
            scanned += 1
    assert scanned > 5


def test_request_timeout_cancels_the_request_with_504(server):
    """limits.request_timeout_s (live) bounds a request: past it the client gets a 504 and the
    row leaves the batch instead of generating on for nobody."""
    short = make_config(server["port"], server["base"], server["expanded"],
                        limits={"request_timeout_s": 0.01})
    redeploy(short)
    try:
        before = model_stats("narrow")
        r = raw_post(server, "/v1/completions", json.dumps({
            "model": "narrow", "prompt": "Tell", "max_tokens": 200, "ignore_eos": True}))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        time.sleep(2.0)
        st = wait_stats("narrow", lambda s: s["running"] == 0 and s["pending"] == 0)
        assert st["running"] == 0 and st["finished"] == before["finished"], (before, st)
    finally:
        redeploy(server["cfg"])


# --- canary ----------------------------------------------------------------------------------------

def _served(client, model="llamapro"):
    r = client.completions.with_raw_response.create(model=model, prompt="x", max_tokens=1)
    body = r.parse()
    return body.model, r.headers["x-llamapro-replica"], r.headers["x-llamapro-ingress"]


def test_canary_split_and_named_models(server, client):
    n = 240
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda _: _served(client)[0], range(n)))
    share = Counter(served)["base"] / n
    # 4 binomial standard deviations: sqrt(.75 * .25 / 240) = 0.028
    assert abs(share - WEIGHTS["base"]) < 0.112, Counter(served)
    assert {_served(client, "expanded")[0] for _ in range(10)} == {"expanded"}
    r = raw_post(server, "/v1/completions",
                 json.dumps({"prompt": "x", "max_tokens": 1}))  # no model: routed as the alias
    assert r.status_code == 200 and r.json()["model"] in WEIGHTS


def test_runtime_switch_drops_nothing(server, client):
    _, exp_replica, ingress = _served(client, "expanded")

    def one():
        return _served(client)[0]

    cfg = server["cfg"]
    for target in ("expanded", "base"):  # shift all traffic to the canary, then roll back
        new = make_config(server["port"], server["base"], server["expanded"], server["keyfile"],
                          weights={target: 1.0})
        with LoadDriver(one, threads=3) as load:
            time.sleep(1.0)
            redeploy(new)
            switched = time.monotonic()
            time.sleep(1.0)
        assert load.errors == [] and load.backpressure == 0
        after = [m for t, m in load.results if t > switched + 0.5]
        assert after and set(after) == {target}, Counter(after)
        assert len(load.results) > 10
    # applied in place: the same ingress and model replicas kept serving (no restart)
    _, exp_replica2, ingress2 = _served(client, "expanded")
    assert (exp_replica2, ingress2) == (exp_replica, ingress)
    redeploy(cfg)  # back to the module's config


# --- autoscaling under load (last: it leaves base with autoscaling on) -----------------------------

def test_autoscaling_up_to_two_and_back_down(server, client):
    from llamapro.serve import replica_counts

    fast = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
            "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5,
            "look_back_period_s": 2}
    cfg = make_config(server["port"], server["base"], server["expanded"], server["keyfile"],
                      base_autoscaling=fast)
    redeploy(cfg)  # an autoscaling change is applied in place too

    def one():
        r = client.completions.create(model="base", prompt="Load", max_tokens=32,
                                      extra_body={"ignore_eos": True})
        return r.model

    counts, peak = [], 0
    with LoadDriver(one, threads=10, max_requests=3000) as load:
        deadline = time.monotonic() + 180  # generous: a new replica loads torch on a busy box
        while time.monotonic() < deadline:
            n = replica_counts(APP).get("model-base", 0)
            counts.append(n)
            peak = max(peak, n)
            if peak >= 2:
                time.sleep(2.0)  # let the second replica take traffic
                break
            time.sleep(0.5)
    assert peak == 2, counts
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and replica_counts(APP).get("model-base") != 1:
        time.sleep(0.5)
    assert replica_counts(APP).get("model-base") == 1
    assert load.errors == [], load.errors[:5]  # only backpressure (503) may occur
    assert len(load.results) > 20
