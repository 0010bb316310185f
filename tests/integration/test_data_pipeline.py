"""The Ray Data pipeline on a real local cluster with the demo model's real tokenizer: two
Train-style consumers, the mixture, the held-out split, bad input, instruction data, preview."""

import hashlib
import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamapro import data as D
from llamapro.config import DataConfig, SourceConfig

pytestmark = pytest.mark.integration

SEQ = 64
WORDS = ("kernel package mirror archive policy shell daemon socket module library python "
         "function class method string buffer thread signal").split()


@pytest.fixture(scope="module")
def tok():
    from llamapro.demo import ensure_demo_model
    from llamapro.loading import load_tokenizer

    return D.TokenizerBundle(load_tokenizer(ensure_demo_model()))


def _doc(rng, marker):
    return f"{marker} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A domain source (4 jsonl shards, DomNNNNNq markers) and a larger retention source
    (3 parquet shards, RetNNNNNq markers); every document starts with its unique marker."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "dom").mkdir()
    dom_docs, ret_docs = [], []
    for s in range(4):
        with open(root / "dom" / f"part-{s}.jsonl", "w") as f:
            for i in range(250):
                d = _doc(rng, f"Dom{s * 1000 + i:05d}q")
                dom_docs.append(d)
                f.write(json.dumps({"text": d, "id": i}) + "\n")
    (root / "ret").mkdir()
    for s in range(3):
        docs = [_doc(rng, f"Ret{s * 1000 + i:05d}q") for i in range(500)]
        ret_docs += docs
        pq.write_table(pa.table({"text": docs}), root / "ret" / f"part-{s}.parquet")
    return root, dom_docs, ret_docs


def _cfg(root, **kw):
    return DataConfig(sources=[
        SourceConfig(name="dom", paths=[str(root / "dom")], weight=0.7, eval_fraction=0.1),
        SourceConfig(name="ret", paths=[f"{root}/ret/*.parquet"], weight=0.3, eval_fraction=0.1),
    ], seq_len=SEQ, **kw)


def _markers(bundle, ids) -> set[str]:
    return set(re.findall(r"(?:Dom|Ret)\d{5}q", bundle.decode(np.asarray(ids).ravel())))


def _digest(row) -> str:
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).hexdigest()


@pytest.fixture(scope="module")
def train_run(ray_start_4_cpus, corpus, tok):
    """One full pass over the training stream, on the driver."""
    root, _, _ = corpus
    ds = D.build_train_dataset(_cfg(root), tok)
    ids, labels, source = [], [], []
    for b in ds.iter_batches(batch_size=512, batch_format="numpy"):
        ids.append(b["input_ids"])
        labels.append(b["labels"])
        source.append(b["source"])
    return ds, np.concatenate(ids), np.concatenate(labels), np.concatenate(source)


def test_two_train_style_consumers_get_disjoint_full_blocks(ray_start_4_cpus, train_run):
    ray = ray_start_4_cpus
    ds, ids, _, _ = train_run

    @ray.remote(num_cpus=1)  # like a Train worker, it holds a CPU while Ray Data works
    class Consumer:
        def consume(self, shard):
            import hashlib

            digests, shapes, dtypes = [], set(), set()
            for batch in shard.iter_torch_batches(batch_size=16):
                x = batch["input_ids"]
                shapes.add(tuple(x.shape[1:]) + tuple(batch["labels"].shape[1:]))
                dtypes.add((str(x.dtype), str(batch["labels"].dtype), str(batch["source"].dtype)))
                digests += [hashlib.blake2b(r.tobytes(), digest_size=16).hexdigest()
                            for r in x.numpy()]
            return digests, shapes, dtypes

    shards = ds.streaming_split(2, equal=True)
    consumers = [Consumer.remote() for _ in shards]
    (a, shape_a, dt_a), (b, shape_b, dt_b) = ray.get(
        [c.consume.remote(s) for c, s in zip(consumers, shards)])
    assert shape_a == shape_b == {(SEQ, SEQ)}  # only full blocks, input_ids and labels alike
    assert dt_a == dt_b == {("torch.int64", "torch.int64", "torch.int32")}
    assert len(a) == len(b) > 100
    assert not set(a) & set(b)  # disjoint streams
    # Together they received the same blocks a plain pass produced: the pipeline is
    # deterministic and streaming_split loses at most the rows that equal=True trims.
    full = {_digest(r) for r in ids}
    assert set(a) | set(b) <= full and len(a) + len(b) >= len(full) - 2


def test_mixture_ratio_holds(train_run, corpus, tok):
    _, ids, _, source = train_run
    share = float(np.mean(source == 0))
    assert abs(share - 0.7) < 0.05, share
    # a block holds documents of one source only
    for row, s in zip(ids[::7], source[::7]):
        kinds = {m[:3] for m in _markers(tok, row)}
        assert kinds <= ({"Dom"} if s == 0 else {"Ret"})


def test_held_out_documents_never_reach_training(ray_start_4_cpus, train_run, corpus, tok):
    root, dom_docs, ret_docs = corpus
    _, ids, labels, _ = train_run
    assert (labels == ids).all()  # raw text: loss on every token
    trained = _markers(tok, ids)
    cfg = _cfg(root)
    for name, docs in (("dom", dom_docs), ("ret", ret_docs)):
        expected = {d.split()[0] for d in docs if D.is_held_out(d, cfg.seed, 0.1)}
        held = set()
        for b in D.build_eval_dataset(cfg, tok, name).iter_batches(batch_size=256,
                                                                   batch_format="numpy"):
            assert b["input_ids"].shape[1] == SEQ
            held |= _markers(tok, b["input_ids"])
        assert held == expected and len(held) > 10  # every held-out document, whole
        assert not held & trained


def _bad_corpus(root):
    """1000 good documents, and one bad record of each kind plus a truncated parquet shard."""
    (root / "bad").mkdir()
    rng = random.Random(1)
    lines = [json.dumps({"text": _doc(rng, f"Dom{i:05d}q")}).encode() for i in range(1000)]
    lines[10:10] = [b"{not json", b'{"title": "no text"}', b'{"text": ""}',
                    b'{"text": "caf\xe9 latin-1"}', b'{"text": 42}']
    (root / "bad" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"text": ["x " * 50] * 100}), root / "bad" / "cut.parquet")
    raw = (root / "bad" / "cut.parquet").read_bytes()
    (root / "bad" / "cut.parquet").write_bytes(raw[: len(raw) // 2])


def test_bad_input_is_skipped_counted_and_budgeted(ray_start_4_cpus, tmp_path, tok):
    _bad_corpus(tmp_path)
    src = SourceConfig(name="web", paths=[str(tmp_path / "bad")], eval_fraction=0.0)

    # within budget (1 of 2 files is unreadable, so the budget must allow 50%): no crash
    ok = DataConfig(sources=[src], seq_len=SEQ, max_skip_fraction=0.5)
    report = D.preview(ok, tok)
    [s] = report["sources"]
    assert s["skipped"] == {"bad_json": 1, "missing_field": 1, "empty": 1, "bad_utf8": 1,
                            "wrong_type": 1}
    assert s["files_skipped"] == {"unreadable_file": 1}
    assert "cut.parquet" in s["skip_examples"]["unreadable_file"][0]
    assert s["docs_used"] == 1000 and report["ok"] and report["total_blocks"] > 0
    assert report["first_block"]["text"].startswith("Dom00000q")

    # over budget: the training stream fails clearly, naming the source and the reasons
    strict = DataConfig(sources=[src], seq_len=SEQ, max_skip_fraction=0.01)
    with pytest.raises(D.DataError, match=r"source 'web' skipped 5 of 1005 documents.*1 of 2 "
                                          r"files.*max_skip_fraction=0.01.*unreadable_file"):
        for _ in D.build_train_dataset(strict, tok).iter_batches(batch_size=64):
            pass


def test_a_source_that_yields_nothing_fails_and_a_wrong_path_is_named(ray_start_4_cpus,
                                                                      tmp_path, tok):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jsonl").write_text("{broken\n" * 20 + '{"body": "x"}\n')
    (tmp_path / "good.txt").write_text(" ".join(WORDS * 200))
    cfg = DataConfig(seq_len=SEQ, max_skip_fraction=1.0, sources=[
        SourceConfig(name="good", paths=[str(tmp_path / "good.txt")], eval_fraction=0.0),
        SourceConfig(name="junk", paths=[str(tmp_path / "junk")], weight=0.5)])
    with pytest.raises(D.DataError, match=r"source 'junk' yielded no training documents: read "
                                          r"21 from 1 files, skipped 21 \(bad_json 20"):
        for _ in D.build_train_dataset(cfg, tok).iter_batches(batch_size=64):
            pass
    cfg.sources[1].paths = [str(tmp_path / "missing-dir")]
    with pytest.raises(D.DataPathError, match=r"data.sources\[1\] \(junk\): path "
                                              r"'.*missing-dir' does not exist"):
        D.build_train_dataset(cfg, tok)


def test_instruction_data_masks_prompts(ray_start_4_cpus, tmp_path, tok):
    rng = random.Random(2)
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(120):
            q = " ".join(rng.choice(WORDS) for _ in range(8))
            if i % 2:
                rec = {"messages": [{"role": "user", "content": f"Q{i:03d}: {q}?"},
                                    {"role": "assistant", "content": f"A{i:03d}z {q}."}]}
            else:
                rec = {"instruction": f"Q{i:03d}: {q}?", "input": "", "output": f"A{i:03d}z ok."}
            f.write(json.dumps(rec) + "\n")
    cfg = DataConfig(seq_len=SEQ, sources=[SourceConfig(
        name="qa", paths=[str(tmp_path / "qa.jsonl")], kind="instruct", eval_fraction=0.0)])
    rows = D.build_train_dataset(cfg, tok).take_all()
    assert rows
    trained, prompts = set(), set()
    for r in rows:
        ids, labels = np.asarray(r["input_ids"]), np.asarray(r["labels"])
        assert len(ids) == SEQ and ((labels == ids) | (labels == D.IGNORE_INDEX)).all()
        trained |= set(re.findall(r"[AQ]\d{3}z?", tok.decode(ids[labels != D.IGNORE_INDEX])))
        prompts |= set(re.findall(r"Q\d{3}", tok.decode(ids)))
    assert any(t.startswith("A") for t in trained)
    assert not any(t.startswith("Q") for t in trained)  # questions never carry loss
    assert len(prompts) > 100


def test_preview_cli_json_and_table(ray_start_4_cpus, corpus, tmp_path, capsys):
    from llamapro.cli.data import add_data_commands
    from llamapro.demo import ensure_demo_model

    root, _, _ = corpus
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
data:
  seq_len: {SEQ}
  sources:
    - {{name: dom, paths: ["{root}/dom"], weight: 0.7}}
    - {{name: ret, paths: ["{root}/ret"], weight: 0.3}}
""")
    import argparse

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["data", "preview", "--config", str(cfg), "--json", "--tokenizer",
                              str(ensure_demo_model()), "--max-files", "2"])
    assert args.fn(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["sources"]] == ["dom", "ret"]
    assert all(s["files"] == 2 and s["status"] == "ok" for s in report["sources"])
    assert report["ok"] and report["first_block"]["tokens"] == SEQ

    from llamapro.data import format_preview

    text = format_preview(report)
    assert "dom" in text and "first block (source" in text and "OK:" in text
