"""Sections rendered as Markdown and as one self-contained HTML page (inline CSS, no scripts, no
external resources; images by relative path)."""

from __future__ import annotations

import html


def strip_verdict(summary: str) -> str:
    """The gate summary without its own "Regression gate PASSED:" lead (the heading says it)."""
    head, sep, rest = summary.partition(": ")
    return rest[:1].upper() + rest[1:] if sep and head.startswith("Regression gate") else summary


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        kind = sec[0]
        if kind == "verdict":
            out += [f"**Regression gate: {sec[1]}.** {strip_verdict(sec[2])}", ""]
        elif kind == "h2":
            out += [f"## {sec[1]}", ""]
        elif kind == "p":
            out += [sec[1], ""]
        elif kind == "img":
            out += [f"![{sec[2]}]({sec[1]})", ""]
        elif kind == "table":
            out += md_table(sec[1], sec[2]) + [""]
    return "\n".join(out)


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.verdict{padding:.8em 1em;border-radius:6px;font-size:1.05em}
.PASSED{background:#e6f4ea;border:1px solid #2ca02c}
.FAILED{background:#fde8e8;border:1px solid #d62728}
.DISABLED,.NOT{background:#f3f3f3;border:1px solid #999}
code{background:#f4f4f4;padding:0 .2em}
""".strip()

def _html_inline(s: str) -> str:
    """Escape, then render `code` spans (the only Markdown the text uses)."""
    parts = html.escape(str(s)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        kind = sec[0]
        if kind == "verdict":
            out.append(f'<div class="verdict {sec[1].split()[0]}"><b>Regression gate: {html.escape(sec[1])}.</b> '
                       f"{_html_inline(strip_verdict(sec[2]))}</div>")
        elif kind == "h2":
            out.append(f"<h2>{html.escape(sec[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{_html_inline(sec[1])}</p>")
        elif kind == "img":
            out.append(f'<figure><img src="{html.escape(sec[1])}" alt="{html.escape(sec[2])}">'
                       f"<figcaption>{html.escape(sec[2])}</figcaption></figure>")
        elif kind == "table":
            head, rows = sec[1], sec[2]
            out.append("<table>")
            if any(head):
                out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in r) + "</tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
