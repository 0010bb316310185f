"""Reading shards without Ray: every kind of bad input is skipped and counted with its reason;
paths resolve (files, directories, globs, URIs) and a wrong one is named."""

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamapro import data as D
from llamapro.config import SourceConfig


def read_all(path, **src_kw):
    """(documents, {reason: count}, {file reason: count}) of the shards under ``path``."""
    src = SourceConfig(name="s", paths=[str(path)], **src_kw)
    counts = D.new_counts()
    docs = []
    for ref in D.resolve_paths(src.paths, src.format):
        for doc, reason, _ in D.read_guarded(ref, src, 1 << 16, counts):
            if doc is None:
                D.record_skip(counts, reason, "x")
            else:
                docs.append(doc)
    return docs, counts["skipped"], counts["files_skipped"]


def test_jsonl_bad_records_are_counted_by_reason(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"\n".join([
        b'{"text": "one"}',
        b'{"text": "two", "meta": 1}',
        b"{not json",
        b'["a list"]',
        b'{"other": "field"}',
        b'{"text": null}',
        b'{"text": 5}',
        b'{"text": "   "}',
        b'{"text": "caf\xe9"}',              # latin-1 byte, not UTF-8
        b"",                                 # a blank line is no document
        b'{"text": "' + b"x" * 70000 + b'"}',  # over max_doc_bytes (64 KiB here)
        b'{"text": "three"}',
        b'{"text": "truncated at the end',
    ]))
    docs, skipped, files = read_all(f)
    assert docs == ["one", "two", "three"]
    assert skipped == {"bad_json": 3, "missing_field": 2, "wrong_type": 1, "empty": 1,
                       "bad_utf8": 1, "too_large": 1}
    assert files == {}


def test_text_field_is_configurable(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "hello"}\n{"text": "no"}\n')
    docs, skipped, _ = read_all(tmp_path / "a.jsonl", text_field="body")
    assert docs == ["hello"] and skipped == {"missing_field": 1}


def test_compressed_shards_and_a_truncated_one(tmp_path):
    lines = "".join(json.dumps({"text": f"document number {i} " + "word " * 10}) + "\n"
                    for i in range(20000)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.bz2").write_bytes(bz2.compress(lines))
    docs, skipped, files = read_all(tmp_path)
    assert len(docs) == 40000 and not skipped and not files
    whole = gzip.compress(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # cut mid-stream
    docs, skipped, files = read_all(tmp_path / "a.jsonl.gz")
    assert files == {"unreadable_file": 1}
    assert 0 < len(docs) < 20000  # what was readable before the cut is kept


def test_plain_text_units(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"first para\nstill first\n\n\nsecond para\n  \nthird\n")
    assert read_all(f, text_unit="file")[0] == [f.read_text()]
    assert read_all(f, text_unit="paragraph")[0] == ["first para\nstill first", "second para",
                                                    "third"]
    assert read_all(f, text_unit="line")[0] == ["first para", "still first", "second para",
                                               "third"]
    g = tmp_path / "b.txt"
    g.write_bytes(b"good line\nbad \xff\xfe line\n")
    docs, skipped, _ = read_all(g, text_unit="line")
    assert docs == ["good line"] and skipped == {"bad_utf8": 1}
    (tmp_path / "empty.txt").write_bytes(b"  \n")
    assert read_all(tmp_path / "empty.txt")[1] == {"empty": 1}


def test_parquet_good_missing_column_binary_and_truncated(tmp_path):
    pq.write_table(pa.table({"text": ["a", "", None, "b"]}), tmp_path / "good.parquet")
    docs, skipped, _ = read_all(tmp_path / "good.parquet")
    assert docs == ["a", "b"] and skipped == {"empty": 1, "missing_field": 1}

    pq.write_table(pa.table({"body": ["x", "y", "z"]}), tmp_path / "nocol.parquet")
    assert read_all(tmp_path / "nocol.parquet")[1] == {"missing_field": 3}

    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}),
                   tmp_path / "bin.parquet")
    docs, skipped, _ = read_all(tmp_path / "bin.parquet")
    assert docs == ["ok"] and skipped == {"bad_utf8": 1}

    raw = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    docs, skipped, files = read_all(tmp_path / "cut.parquet")
    assert docs == [] and files == {"unreadable_file": 1}


def test_instruction_records(tmp_path):
    f = tmp_path / "qa.jsonl"
    recs = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi!"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"instruction": "Say yes", "output": "yes", "system": "Be brief."},
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "wizard", "content": "?"}, {"role": "assistant", "content": "!"}]},
        {"messages": "not a list"},
        {"messages": []},
        {"instruction": "no output"},
        {"prompt": "unknown shape"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    docs, skipped, _ = read_all(f, kind="instruct")
    assert docs[0] == recs[0]["messages"]
    assert docs[1] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert docs[2] == [{"role": "user", "content": "Add\n\n2 and 2"},
                       {"role": "assistant", "content": "4"}]
    assert docs[3][0] == {"role": "system", "content": "Be brief."}
    assert skipped == {"bad_messages": 2, "wrong_type": 1, "empty": 1, "missing_field": 2}


def test_paths_files_dirs_globs_uris(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for name in ["a.jsonl", "sub/b.jsonl.gz", "c.parquet", "d.txt", "README.md", "manifest.json",
                 ".hidden.jsonl", "_SUCCESS", "e.json"]:
        (d / name).write_bytes(b"")
    (d / ".cache").mkdir()
    (d / ".cache" / "x.jsonl").write_bytes(b"")

    def names(refs):
        return sorted(r.path[len(str(d)) + 1:] for r in refs)

    assert names(D.resolve_paths([str(d)])) == ["a.jsonl", "c.parquet", "d.txt", "sub/b.jsonl.gz"]
    assert names(D.resolve_paths([str(d)], "jsonl")) == ["a.jsonl", "e.json", "manifest.json",
                                                          "sub/b.jsonl.gz"]
    assert names(D.resolve_paths([f"{d}/**/*.jsonl*"])) == ["a.jsonl", "sub/b.jsonl.gz"]
    assert names(D.resolve_paths([f"file://{d}/c.parquet", str(d / "c.parquet")])) == [
        "c.parquet"]  # the same file twice is read once
    refs = D.resolve_paths([str(d / "README.md")])  # named explicitly: taken, read as text
    assert [r.format for r in refs] == ["text"]


def test_a_wrong_path_is_named(tmp_path):
    with pytest.raises(D.DataPathError, match=r"data.sources\[0\] \(x\): path '.*/nope' does "
                                              r"not exist"):
        D.resolve_paths([str(tmp_path / "nope")], where="data.sources[0] (x)")
    with pytest.raises(D.DataPathError, match="glob '.*/\\*.jsonl' matches no files"):
        D.resolve_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(D.DataPathError, match="holds no data files"):
        D.resolve_paths([str(tmp_path)])
    with pytest.raises(D.DataPathError, match="demo corpus 'demo:nosuch' is not built"):
        D.resolve_paths(["demo:nosuch"])
