"""Counts of what the pipeline saw (documents, skips with reasons and examples, tokens, blocks) and
the verdict on a fully read source against the skip budget."""

from __future__ import annotations


def new_counts() -> dict:
    """Empty counts of one work unit (or of a source, once merged)."""
    return {"docs_read": 0, "docs_used": 0, "docs_held_out": 0, "skipped": {}, "examples": {},
            "files": 0, "files_skipped": {}, "tokens": 0, "loss_tokens": 0, "blocks_packed": 0,
            "blocks_emitted": 0, "tail_tokens_dropped": 0, "pad_tokens": 0}


def record_skip(counts: dict, reason: str, loc: str, files: bool = False):
    """Count a skipped document (or, with ``files``, a skipped file) and keep up to three
    examples of where it was."""
    key = "files_skipped" if files else "skipped"
    counts[key][reason] = counts[key].get(reason, 0) + 1
    ex = counts["examples"].setdefault(reason, [])
    if len(ex) < 3:
        ex.append(loc)


def merge_counts(parts) -> dict:
    """The sum of several counts (examples: the first three per reason)."""
    total = new_counts()
    for c in parts:
        for k, v in c.items():
            if k in ("skipped", "files_skipped"):
                for r, n in v.items():
                    total[k][r] = total[k].get(r, 0) + n
            elif k == "examples":
                for r, ex in v.items():
                    have = total[k].setdefault(r, [])
                    have.extend(ex[: max(0, 3 - len(have))])
            else:
                total[k] += v
    return total


def _reasons(counts: dict) -> str:
    parts = []
    for key in ("skipped", "files_skipped"):
        for r, n in sorted(counts[key].items(), key=lambda kv: -kv[1]):
            ex = counts["examples"].get(r) or []
            unit = " files" if key == "files_skipped" else ""
            parts.append(f"{r} {n}{unit}" + (f" (e.g. {ex[0]})" if ex else ""))
    return "; ".join(parts) or "nothing skipped"


def check_source(name: str, counts: dict, *, files_total: int, max_skip_fraction: float,
                 seq_len: int, split: str = "train") -> str | None:
    """The verdict on a fully read source: None if it can feed a run, else why not."""
    skipped = sum(counts["skipped"].values())
    bad_files = sum(counts["files_skipped"].values())
    seen = counts["docs_read"]
    if counts["docs_used"] == 0:
        what = "training" if split == "train" else "held-out"
        held = (f", {counts['docs_held_out']} held out for evaluation"
                if split == "train" and counts["docs_held_out"] else "")
        return (f"source {name!r} yielded no {what} documents: read {seen} from "
                f"{files_total} files, skipped {skipped}{held} ({_reasons(counts)})")
    if counts["blocks_packed"] == 0:
        return (f"source {name!r} yielded no full block: {counts['docs_used']} documents hold "
                f"{counts['tokens']} tokens, fewer than data.seq_len={seq_len} per work unit; "
                "lower data.seq_len or add data")
    doc_share = skipped / max(1, seen)
    file_share = bad_files / max(1, files_total)
    if doc_share > max_skip_fraction or file_share > max_skip_fraction:
        return (f"source {name!r} skipped {skipped} of {seen} documents ({doc_share:.1%}) and "
                f"{bad_files} of {files_total} files ({file_share:.1%}), over "
                f"data.max_skip_fraction={max_skip_fraction:g}: {_reasons(counts)}")
    return None
