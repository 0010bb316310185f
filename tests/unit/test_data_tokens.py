"""Tokenizing, label masking, packing, the held-out split and the mixture arithmetic, with the
demo model's real tokenizer and no Ray."""

import json
import random
import re

import numpy as np
import pytest

from llamapro import data as D
from llamapro.config import SourceConfig


@pytest.fixture(scope="module")
def tok():
    from llamapro.demo import ensure_demo_model
    from llamapro.loading import load_tokenizer

    return load_tokenizer(ensure_demo_model())


@pytest.fixture(scope="module")
def enc(tok):
    return D.Encoder(tok)


# --- raw text ---------------------------------------------------------------------------------

def test_raw_text_ends_with_eos_and_special_strings_stay_text(tok, enc):
    a, b = enc.encode_texts(["Hello world.", "Docs mention <|im_end|> literally."])
    assert a[-1] == tok.eos_token_id and tok.decode(a[:-1]) == "Hello world."
    assert b.count(tok.eos_token_id) == 1  # only the separator, not the quoted marker
    assert tok.decode(b[:-1]) == "Docs mention <|im_end|> literally."


def test_bundle_survives_pickling_without_transformers_state(tok):
    import pickle

    bundle = pickle.loads(pickle.dumps(D.TokenizerBundle(tok)))
    assert bundle._hf is None  # the HF tokenizer is unpickled only when a chat needs it
    ids = D.Encoder(bundle).encode_texts(["same ids"])[0]
    assert ids == D.Encoder(tok).encode_texts(["same ids"])[0]
    assert bundle.decode(ids) == "same ids<|im_end|>"


# --- instruction data -------------------------------------------------------------------------

def trained_text(tok, ids, labels):
    """The tokens that carry loss, decoded; masked runs become ' | '."""
    out, run = [], []
    for i, lab in zip(ids, labels):
        if lab == D.IGNORE_INDEX:
            if run:
                out.append(tok.decode(run))
                run = []
        else:
            assert lab == i  # a label is the token itself (HF shifts internally)
            run.append(i)
    if run:
        out.append(tok.decode(run))
    return " | ".join(out)


def test_chat_labels_only_on_replies_and_their_end_of_turn(tok, enc):
    msgs = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6."}]
    [(ids, labels)] = enc.encode_chats([msgs])
    full = tok.apply_chat_template(msgs, tokenize=False).rstrip()
    assert tok.decode(ids) == full  # exactly the model's own template
    assert ids[-1] == tok.eos_token_id
    assert trained_text(tok, ids, labels) == "4.<|im_end|> | 6.<|im_end|>"


def test_alpaca_and_system_prompt(tok, enc):
    msgs, _ = D.conversation({"instruction": "Name a colour", "input": "", "output": "Blue",
                              "system": "Answer in one word."})
    [(ids, labels)] = enc.encode_chats([msgs])
    text = tok.decode(ids)
    assert "Answer in one word." in text and "Name a colour" in text
    assert trained_text(tok, ids, labels) == "Blue<|im_end|>"


def test_conversation_ending_with_a_user_turn_and_an_empty_reply(tok, enc):
    msgs = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
            {"role": "user", "content": "C?"}]
    [(ids, labels)] = enc.encode_chats([msgs])
    assert trained_text(tok, ids, labels) == "B.<|im_end|>"
    assert labels[-1] == D.IGNORE_INDEX  # the closing user turn carries no loss
    empty_reply = {"messages": [{"role": "user", "content": "A?"},
                                {"role": "assistant", "content": " "}]}
    assert D.conversation(empty_reply) == (None, "bad_messages")


# --- packing ----------------------------------------------------------------------------------

def test_packer_cuts_exact_blocks_in_order_and_accounts_the_tail():
    p = D.Packer(4)
    p.add([1, 2, 3])
    assert p.pop_blocks()[0].shape == (0, 4)
    p.add([4, 5, 6, 7, 8, 9], [-100, -100, 6, 7, 8, 9])
    ids, labels = p.pop_blocks()
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels.tolist() == [[1, 2, 3, -100], [-100, 6, 7, 8]]
    assert ids.dtype == np.int64 and p.pending == 1
    p.add([10, 11])
    assert p.tail() == 3 and p.pending == 0
    p.add([1, 2])
    ids, labels = p.pad_tail(pad_id=0)
    assert ids.tolist() == [[1, 2, 0, 0]] and labels.tolist() == [[1, 2, -100, -100]]
    assert p.pad_tail(0) is None


# --- held-out split ---------------------------------------------------------------------------

def test_held_out_split_is_stable_proportional_and_content_keyed():
    docs = [f"document {i}" for i in range(20000)]
    held = [d for d in docs if D.is_held_out(d, 0, 0.1)]
    assert 0.09 < len(held) / len(docs) < 0.11
    assert held == [d for d in docs if D.is_held_out(d, 0, 0.1)]  # stable
    assert set(held) != {d for d in docs if D.is_held_out(d, 1, 0.1)}  # the seed matters
    assert not any(D.is_held_out(d, 0, 0.0) for d in docs[:100])
    assert all(D.is_held_out(d, 0, 1.0) for d in docs[:100])
    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert D.doc_key(conv) == D.doc_key(json.loads(json.dumps(conv)))


def test_process_unit_never_trains_on_held_out_documents(tmp_path, tok):
    rng = random.Random(0)
    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(400):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(30))
            f.write(json.dumps({"text": f"DOC{i:04d}X {words}"}) + "\n")
    src = SourceConfig(name="s", paths=[str(tmp_path)], eval_fraction=0.2)
    unit = D.plan_units(0, src, D.resolve_paths(src.paths), seed=0, actors=1)[0]
    enc = D.Encoder(tok)

    def markers(split):
        counts = D.new_counts()
        blocks = list(D.process_unit(unit, src, enc, seq_len=64, split=split, seed=0, rate=1.0,
                                     pass_index=0, max_doc_bytes=1 << 20, counts=counts))
        ids = np.concatenate([b[0] for b in blocks])
        assert ids.shape[1] == 64
        text = tok.decode(ids.ravel().tolist())
        return set(re.findall(r"DOC\d{4}X", text)), counts

    train, ctr = markers("train")
    held, cev = markers("eval")
    assert held and not train & held
    assert len(train) + len(held) >= 395  # the dropped tail may cut a marker or two
    assert ctr["docs_held_out"] == cev["docs_held_out"] == cev["docs_used"]
    assert cev["pad_tokens"] > 0 and ctr["tail_tokens_dropped"] > 0


# --- mixture ----------------------------------------------------------------------------------

def test_mixture_rates_meet_the_weights():
    tokens = {"dom": 1000.0, "ret": 9000.0}
    down = D.mixture_rates(tokens, {"dom": 0.7, "ret": 0.3}, "downsample")
    assert down["dom"] == pytest.approx(1.0)
    kept = {n: tokens[n] * r for n, r in down.items()}
    assert kept["dom"] / sum(kept.values()) == pytest.approx(0.7)
    up = D.mixture_rates(tokens, {"dom": 0.7, "ret": 0.3}, "upsample")
    assert up["ret"] == pytest.approx(1.0) and up["dom"] == pytest.approx(21.0)
    assert D.mixture_rates(tokens, {"dom": 1, "ret": 0}, "downsample") == {"dom": 1.0, "ret": 0.0}


def test_block_copies_are_deterministic_and_average_the_rate():
    draws = [D.block_copies(2.3, 0, "s", "s/0", i) for i in range(20000)]
    assert set(draws) == {2, 3} and abs(np.mean(draws) - 2.3) < 0.02
    assert draws == [D.block_copies(2.3, 0, "s", "s/0", i) for i in range(20000)]
    assert draws != [D.block_copies(2.3, 1, "s", "s/0", i) for i in range(20000)]


def test_estimate_is_close_for_a_homogeneous_source(tmp_path, tok):
    rng = random.Random(1)
    for s in range(6):
        with open(tmp_path / f"s{s}.jsonl", "w") as f:
            for i in range(300):
                n = rng.randint(10, 120)
                f.write(json.dumps({"text": " ".join(rng.choice(["red", "green", "blue", "sky"])
                                                     for _ in range(n))}) + "\n")
    src = SourceConfig(name="s", paths=[str(tmp_path)], eval_fraction=0.1)
    units = D.plan_units(0, src, D.resolve_paths(src.paths), seed=0, actors=2)
    enc = D.Encoder(tok)
    est = D.estimate_tokens(src, units, enc, seed=0, sample_bytes=30000)
    actual = 0
    for u in units:
        c = D.new_counts()
        list(D.process_unit(u, src, enc, seq_len=64, split="train", seed=0, rate=1.0,
                            pass_index=0, max_doc_bytes=1 << 20, counts=c))
        actual += c["tokens"]
    assert abs(est - actual) / actual < 0.1


def test_check_source_verdicts():
    c = D.new_counts()
    c.update(docs_read=100, docs_used=0, docs_held_out=0, skipped={"bad_json": 100},
             examples={"bad_json": ["a.jsonl:1"]})
    msg = D.check_source("web", c, files_total=2, max_skip_fraction=0.05, seq_len=8)
    assert "source 'web' yielded no training documents" in msg and "bad_json 100" in msg
    c.update(docs_used=90, blocks_packed=10, skipped={"bad_json": 10})
    msg = D.check_source("web", c, files_total=2, max_skip_fraction=0.05, seq_len=8)
    assert "skipped 10 of 100 documents (10.0%)" in msg and "max_skip_fraction=0.05" in msg
    assert D.check_source("web", c, files_total=2, max_skip_fraction=0.2, seq_len=8) is None
    c.update(files_skipped={"unreadable_file": 1})
    assert "1 of 2 files" in D.check_source("web", c, files_total=2, max_skip_fraction=0.2,
                                            seq_len=8)
    c.update(files_skipped={}, blocks_packed=0)
    assert "no full block" in D.check_source("web", c, files_total=2, max_skip_fraction=0.2,
                                             seq_len=8)
