"""The demo corpora: cutting manuals into documents, and building the parquet shards from the
installed Debian packages (skipped where they are not installed: `llamapro data corpora`
installs them)."""

import os

import pyarrow.parquet as pq
import pytest

from llamapro import data as D
from llamapro.data import corpora as C


def test_split_rst_at_titles_keeping_labels_and_overlines():
    text = ("Intro line\n\n.. _sec-a:\n\nSection A\n=========\n\nBody A.\n\n"
            "#######\nPart B\n#######\n\nBody B.\n\nSub\n---\nBody C.\n")
    parts = C.split_rst(text)
    assert parts[0] == "Intro line"
    assert parts[1].startswith(".. _sec-a:\n\nSection A\n=========")
    assert parts[2].startswith("#######\nPart B") and parts[3].startswith("Sub\n---")


def test_merge_small_builds_readable_documents():
    assert C.merge_small(["a" * 10, "b" * 10, "c" * 2000, "d" * 5], lo=100) == [
        "a" * 10 + "\n\n" + "b" * 10 + "\n\n" + "c" * 2000, "d" * 5]


def test_debian_reference_sections_skip_the_table_of_contents():
    nbsp = "\u00a0"
    text = (f"Table of Contents\n1. Tutorials\n    1.1. Basics\nChapter{nbsp}1.{nbsp}Tutorials\n\n"
            f"    Intro text.\n\n1.1.{nbsp}Basics\n\n    Basic text.\n")
    assert C.split_debian_reference(text) == ["Chapter 1. Tutorials\n\nIntro text.",
                                              "1.1. Basics\n\nBasic text."]


def test_split_pod_at_head1_and_head2():
    text = "=pod\n\nintro\n\n=head1 NAME\n\nperlx - a page\n\n=head2 Sub\n\nbody\n\n=item x\n"
    assert C.split_pod(text) == ["=pod\n\nintro", "=head1 NAME\n\nperlx - a page",
                                 "=head2 Sub\n\nbody\n\n=item x"]


@pytest.mark.skipif(not all(os.path.exists(p) for c in C.CORPORA
                            for p in C._required_paths(c)),
                    reason="the Debian documentation packages are not installed "
                           "(`llamapro data corpora` installs them)")
def test_build_corpora_writes_licensed_parquet_shards(tmp_path):
    res = C.build_corpora(tmp_path, max_bytes=300_000, shards=3, install=False, say=lambda m: None)
    assert set(res) == {"debian-manuals", "python-docs", "perl-docs"}
    for name, m in res.items():
        d = tmp_path / name
        shards = sorted(d.glob("part-*.parquet"))
        assert len(shards) == 3
        t = pq.read_table(shards).to_pylist()
        assert len(t) == m["documents"] > 20 and all(r["text"].strip() for r in t)
        assert {r["package"] for r in t} <= set(m["packages"])
        readme = (d / "README.md").read_text()
        assert m["licence"] in readme and all((d / f"COPYRIGHT.{p}").is_file()
                                              for p in m["packages"])
        # the pipeline reads the shards and nothing else from the directory
        assert sorted(r.path for r in D.resolve_paths([str(d)])) == [str(s) for s in shards]
    assert "GPL" in res["debian-manuals"]["licence"] and "PSF" in res["python-docs"]["licence"]
    assert "Artistic" in res["perl-docs"]["licence"] and "not replayed" in res["perl-docs"]["role"]
    again = C.build_corpora(tmp_path, max_bytes=300_000, shards=3, install=False,
                            say=lambda m: None)
    assert again == res  # up to date: reused, not rebuilt
