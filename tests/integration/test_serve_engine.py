"""The transformers engine in-process (no Ray): continuous batching gives exactly the text each request
gets alone, a request arriving mid-generation joins the running batch, and per-request parameters
(seed, stop, max_tokens, cancel) hold inside a batch."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.integration.serve_conftest_helpers import make_tiny_chat_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from llamapro.serve import TransformersEngine

    path = make_tiny_chat_model(tmp_path_factory.mktemp("eng") / "tiny", seed=3)
    return TransformersEngine(str(path), max_running=4, threads=1)


def req(engine, text="Hello", kind="chat", max_tokens=12, temperature=0.0, seed=None, stop=(),
        ignore_eos=True, top_p=1.0):
    r = {"kind": kind, "max_tokens": max_tokens, "default_max_tokens": max_tokens,
         "temperature": temperature, "top_p": top_p, "stop": list(stop), "seed": seed,
         "ignore_eos": ignore_eos}
    if kind == "chat":
        r["messages"] = [{"role": "user", "content": text}]
    else:
        r["prompt"] = text
    return engine.prepare(r)


PROMPTS = ["What is the capital of France?", "Hi", "Write a long poem about the sea and the stars."]


def test_batched_equals_alone_equals_transformers_generate(engine):
    alone = [engine.generate([req(engine, p)])[0]["text"] for p in PROMPTS]
    together = [r["text"] for r in engine.generate([req(engine, p) for p in PROMPTS])]
    assert together == alone
    for p, text in zip(PROMPTS, alone):
        ids = torch.tensor([req(engine, p).ids])
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    min_new_tokens=12, do_sample=False)
        assert engine.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text


def test_a_late_request_joins_the_running_batch(engine):
    solo_long = engine.generate([req(engine, PROMPTS[2], max_tokens=40)])[0]["text"]
    solo_short = engine.generate([req(engine, PROMPTS[0], max_tokens=5)])[0]["text"]
    started, finished = threading.Event(), threading.Event()
    events = []

    def on_long(ev):
        events.append(ev)
        if len(events) >= 5:
            started.set()
        if ev["finish_reason"]:
            finished.set()

    long = req(engine, PROMPTS[2], max_tokens=40)
    long.emit = on_long
    engine.submit([long])
    assert started.wait(60)  # the long request is generating
    short = req(engine, PROMPTS[0], max_tokens=5)
    done = threading.Event()
    short_events = []
    short.emit = lambda ev: (short_events.append(ev), ev["finish_reason"] and done.set())
    engine.submit([short])
    assert done.wait(60) and finished.wait(60)
    assert short.batch_size == 2 and long.batch_size == 2  # merged, not queued behind
    assert "".join(e["text"] for e in short_events) == solo_short
    assert "".join(e["text"] for e in events) == solo_long
    assert events[-1]["completion_tokens"] == 40 and short_events[-1]["completion_tokens"] == 5


def test_seed_stop_and_cancel_inside_a_batch(engine):
    kw = dict(kind="completion", max_tokens=16, temperature=1.0, top_p=0.9)
    a = engine.generate([req(engine, "Once", seed=7, **kw)])[0]["text"]
    b = engine.generate([req(engine, "Other", seed=1, **kw), req(engine, "Once", seed=7, **kw)])
    assert b[1]["text"] == a  # the same seed and prompt give the same text in any batch
    full = engine.generate([req(engine, "Numbers:", kind="completion", max_tokens=24)])[0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = engine.generate([req(engine, "Numbers:", kind="completion", max_tokens=24,
                               stop=[stop])])[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.find(stop)]
    # a cancelled row leaves the batch; its neighbour finishes normally
    gone = req(engine, "bye", max_tokens=40)
    gone.emit = lambda ev: setattr(gone, "cancelled", True)
    stay = req(engine, "stay", max_tokens=8)
    done = threading.Event()
    stay.emit = lambda ev: ev["finish_reason"] and done.set()
    engine.submit([gone, stay])
    assert done.wait(60)
