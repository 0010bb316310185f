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
    # a cancelled row leaves the batch at the next step; its neighbour finishes normally
    before = engine.stats()
    gone_events, running_seen = [], []
    gone = req(engine, "bye", max_tokens=40)
    gone.emit = lambda ev: (gone_events.append(ev), setattr(gone, "cancelled", True))
    stay = req(engine, "stay", max_tokens=8)
    done = threading.Event()

    def on_stay(ev):  # runs on the engine thread: the batch as the next decode step sees it
        running_seen.append(len(engine._rows))
        if ev["finish_reason"]:
            done.set()

    stay.emit = on_stay
    engine.submit([gone, stay])
    assert done.wait(60)
    assert len(gone_events) == 1  # no token generated for it after the cancel
    assert running_seen[0] == 2 and set(running_seen[1:]) == {1}, running_seen
    after = engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"] + 1 and after["running"] == 0


def _collect(p):
    box, done = [], threading.Event()

    def emit(ev):
        box.append(ev)
        if isinstance(ev, BaseException) or ev["finish_reason"]:
            done.set()

    p.emit = emit
    return box, done


def test_a_failing_admission_fails_its_rows_and_the_engine_keeps_serving(engine):
    """A prefill that raises (here a token id beyond the embedding, as a tokenizer larger than its
    model produces; an out-of-memory prefill takes the same path) fails the rows it took with a 500
    instead of stranding them, leaves the running batch untouched, and the next request works."""
    from llamapro.serve import APIError

    expected = engine.generate([req(engine, PROMPTS[0], max_tokens=30)])[0]["text"]

    def bad_row():
        bad = req(engine, "Hi", max_tokens=5)
        bad.ids = bad.ids[:-1] + [engine.vocab_size + 7]  # past validation: a mismatched tokenizer
        return bad

    before = engine.stats()
    # 1) it arrives while another row is generating: that row is untouched
    running = req(engine, PROMPTS[0], max_tokens=30)
    run_events, run_done = _collect(running)
    started = threading.Event()
    emit = running.emit
    running.emit = lambda ev: (emit(ev), started.set())
    engine.submit([running])
    assert started.wait(60)
    bad = bad_row()
    bad_events, bad_done = _collect(bad)
    engine.submit([bad])
    assert bad_done.wait(60) and run_done.wait(60)
    (err,) = bad_events
    assert isinstance(err, APIError) and err.status == 500 and err.code == "engine_error"
    assert "IndexError" in err.message and "keeps serving" in err.message
    assert "".join(e["text"] for e in run_events) == expected
    # 2) it shares one prefill with a good row: the group is retried row by row, only it fails
    good, bad = req(engine, PROMPTS[0], max_tokens=30), bad_row()
    (good_events, good_done), (bad_events, bad_done) = _collect(good), _collect(bad)
    engine.submit([good, bad])
    assert good_done.wait(60) and bad_done.wait(60)
    assert isinstance(bad_events[-1], APIError) and len(bad_events) == 1
    assert "".join(e["text"] for e in good_events) == expected
    after = engine.stats()
    assert after["failed"] == before["failed"] + 2 and after["running"] == after["pending"] == 0
    assert engine.alive()
    assert engine.generate([req(engine, PROMPTS[0], max_tokens=30)])[0]["text"] == expected


def test_a_text_prompt_beyond_the_embedding_is_a_clear_server_error(engine, monkeypatch):
    from llamapro.serve import APIError

    monkeypatch.setattr(engine, "vocab_size", 100)  # a model whose tokenizer outgrew its weights
    with pytest.raises(APIError) as e:
        req(engine, "A sentence with many different tokens in it")
    assert e.value.status == 500 and e.value.code == "tokenizer_model_mismatch"


def test_top_p_zero_is_greedy(engine):
    from llamapro.serve.protocol import parse_sampling

    limits = {"max_tokens": 64, "default_max_tokens": 16}
    s = parse_sampling({"top_p": 0, "temperature": 1.5}, limits)
    assert (s["temperature"], s["top_p"]) == (0.0, 1.0)
    greedy = engine.generate([req(engine, "Once", kind="completion", max_tokens=12)])[0]["text"]
    # the sampler itself keeps the top token whatever top_p says (never the least likely one)
    row = req(engine, "Once", kind="completion", max_tokens=12, temperature=1.0, top_p=1e-9, seed=5)
    assert engine.generate([row])[0]["text"] == greedy
