"""The demo corpora: three real corpora nobody in this project wrote, built from Debian packages.

- **debian-manuals** (the new domain): the Debian Reference (``debian-reference-en``, GPL-2+),
  the Debian Policy Manual (``debian-policy``, GPL-2+) and the Debian Developer's Reference
  (``developers-reference``, GPL-2 or later): Debian system administration and packaging.
  SmolLM2-135M-Instruct is weak on it: perplexity ~20 on its plain text, against ~12 on the
  Python documentation (measured here on 12 windows of 512 tokens each).
- **python-docs** (the replayed retention set): the Python 3 documentation's reStructuredText
  sources (``python3.11-doc``, PSF License 2.0): text the demo model demonstrably knows already.
  The demo replays it in the training mixture, so its perplexity measures how well replayed text
  is kept, not forgetting.
- **perl-docs** (the retention set that is NOT replayed): the Perl 5 manual pages in POD
  (``perl-doc``: perlintro, perlfaq, perlfunc, perlre, ...; GPL-1+ or Artistic License, Perl's
  own terms): general programming documentation the model has seen in pretraining and that no
  demo config trains on (weight 0): a rise of its perplexity is forgetting.

Each manual is cut into documents at its section headings (small sections merged), so the
held-out split (by document hash) holds out whole sections. Each corpus is written as a few
parquet shards (columns ``text``, ``id``, ``package``) plus ``README.md`` (what, which package
and version, licence) and the packages' ``copyright`` files, under
``default_cache_dir()/corpora/<name>`` unless told otherwise:

    llamapro data corpora [--out DIR] [--force]

Missing packages are installed with ``apt-get install --no-install-recommends`` (as root; with an
``apt-get update`` first if the install fails).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from llamapro.config import default_cache_dir
from llamapro.errors import CorpusError

FORMAT_VERSION = 4  # bump when the way a corpus is cut changes: an old build is then rebuilt

MIN_DOC_CHARS = 1500  # sections shorter than this are merged with the next one


@dataclass
class Corpus:
    name: str
    role: str
    description: str
    packages: list[str]
    licence: str
    collect: Callable[[], Iterator[tuple[str, str, str]]]  # -> (id, package, text)


# --- cutting documents ----------------------------------------------------------------------------

_RST_UNDERLINE = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}\s*$")


def split_rst(text: str) -> list[str]:
    """Sections of a reStructuredText file (a title is a line underlined by = - ~ ^ * ...)."""
    lines = text.splitlines()
    starts = [0]
    for i in range(1, len(lines)):
        if (_RST_UNDERLINE.match(lines[i]) and lines[i - 1].strip()
                and not _RST_UNDERLINE.match(lines[i - 1]) and len(lines[i].rstrip()) >= len(
                    lines[i - 1].rstrip())):
            start = i - 1
            if start >= 1 and _RST_UNDERLINE.match(lines[start - 1]):
                start -= 1  # an overlined title
            k = start
            while k >= 1 and not lines[k - 1].strip():
                k -= 1
            while k >= 1 and lines[k - 1].startswith(".. _"):
                k -= 1
                start = k  # keep a section's label (".. _name:") with it
            if start > starts[-1]:
                starts.append(start)
    starts.append(len(lines))
    return ["\n".join(lines[a:b]).strip() for a, b in zip(starts, starts[1:])]


_TXT_HEADING = re.compile(r"^(Chapter \d+\. |Appendix [A-Z]\. |\d+(\.\d+)+\. )\S")


def split_debian_reference(text: str) -> list[str]:
    """Sections of the Debian Reference's plain-text rendering, from Chapter 1 on (the table of
    contents and the title page are left out)."""
    # The renderer writes no-break spaces in headings and in indentation.
    lines = text.replace("\u00a0", " ").splitlines()
    begin = next((i for i, ln in enumerate(lines) if ln.startswith("Chapter 1. ")), 0)
    sections, cur = [], []
    for ln in lines[begin:]:
        if _TXT_HEADING.match(ln) and cur:
            sections.append(cur)
            cur = []
        cur.append(ln[4:] if ln.startswith("    ") else ln)  # the renderer indents body text
    if cur:
        sections.append(cur)
    return ["\n".join(s).strip() for s in sections]


def merge_small(sections: list[str], lo: int = MIN_DOC_CHARS) -> list[str]:
    """Merge runs of short sections (a title, a one-paragraph section) into the next one, so that
    a document is a readable unit of at least ``lo`` characters where the file allows."""
    out, cur = [], ""
    for s in sections:
        if not s:
            continue
        if cur and len(cur) >= lo:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{s}" if cur else s
    if cur:
        out.append(cur)
    return out


# --- the corpora ----------------------------------------------------------------------------------

def _read(path: str) -> str:
    data = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
    return data.decode("utf-8", "replace")


def _rst_docs(pattern: str, package: str, prefix: str, root: str):
    for f in sorted(glob.glob(pattern, recursive=True)):
        rel = os.path.relpath(f, root)
        for k, doc in enumerate(merge_small(split_rst(_read(f)))):
            yield f"{prefix}{rel}#{k}", package, doc


DEBIAN_REFERENCE = "/usr/share/debian-reference/debian-reference.en.txt.gz"
DEBIAN_POLICY = "/usr/share/doc/debian-policy/policy.html/_sources"
DEVELOPERS_REFERENCE = "/usr/share/developers-reference/_sources"


def _debian_manuals():
    for k, doc in enumerate(merge_small(split_debian_reference(_read(DEBIAN_REFERENCE)))):
        yield f"debian-reference#{k}", "debian-reference-en", doc
    yield from _rst_docs(f"{DEBIAN_POLICY}/**/*.rst.txt", "debian-policy", "debian-policy:",
                         DEBIAN_POLICY)
    yield from _rst_docs(f"{DEVELOPERS_REFERENCE}/**/*.rst.txt", "developers-reference",
                         "developers-reference:", DEVELOPERS_REFERENCE)


PYTHON_DOC_SECTIONS = ("tutorial", "howto", "faq", "reference", "using", "extending", "library")


PERL_POD = "/usr/share/perl/5*/pod"
_POD_HEAD = re.compile(r"^=head[12]\b")


def split_pod(text: str) -> list[str]:
    """Sections of a POD file, at its =head1 / =head2 commands."""
    sections, cur = [], []
    for ln in text.splitlines():
        if _POD_HEAD.match(ln) and cur:
            sections.append("\n".join(cur).strip())
            cur = []
        cur.append(ln)
    if cur:
        sections.append("\n".join(cur).strip())
    return sections


def perl_pod_root() -> str | None:
    roots = sorted(glob.glob(PERL_POD))
    return roots[-1] if roots else None


def _perl_docs():
    root = perl_pod_root()
    # Release notes (perl5*delta), the table of contents and the list of diagnostics are lists,
    # not prose: left out.
    files = [f for f in glob.glob(f"{root}/*.pod")
             if not re.search(r"/perl5\d+delta|/perl(toc|diag|delta)\.pod$", f)]
    files.sort(key=lambda f: hashlib.blake2b(os.path.basename(f).encode(), digest_size=8).digest())
    for f in files:
        for k, doc in enumerate(merge_small(split_pod(_read(f)))):
            yield f"perl:{os.path.basename(f)}#{k}", "perl-doc", doc


def python_doc_root() -> str | None:
    """The newest installed python3.X-doc's reST sources."""
    roots = sorted(glob.glob("/usr/share/doc/python3.*/html/_sources"),
                   key=lambda p: [int(x) for x in re.findall(r"python3\.(\d+)", p)[:1] or [0]])
    return roots[-1] if roots else None


def _python_doc_package_of(root: str) -> str:
    minor = re.search(r"python3\.(\d+)", root).group(1)
    return f"python3.{minor}-doc"


def _python_docs():
    root = python_doc_root()
    package = _python_doc_package_of(root)
    files = [f for sec in PYTHON_DOC_SECTIONS
             for f in glob.glob(f"{root}/{sec}/**/*.rst.txt", recursive=True)]
    # Pages in a hash order, so a size cap keeps a spread of the documentation, not the A-Ms.
    files.sort(key=lambda f: hashlib.blake2b(os.path.relpath(f, root).encode(),
                                             digest_size=8).digest())
    for f in files:
        rel = os.path.relpath(f, root)
        for k, doc in enumerate(merge_small(split_rst(_read(f)))):
            yield f"python:{rel}#{k}", package, doc


CORPORA = {
    "debian-manuals": Corpus(
        "debian-manuals", "new domain",
        "Debian system administration and packaging: the Debian Reference (plain-text edition), "
        "the Debian Policy Manual and the Debian Developer's Reference (reStructuredText "
        "sources), cut into sections.",
        ["debian-reference-en", "debian-policy", "developers-reference"],
        "GPL-2+ (Debian Reference, Debian Policy Manual; the Developer's Reference: GPL version "
        "2 or any later version)",
        _debian_manuals),
    "python-docs": Corpus(
        "python-docs", "retention",
        "The Python 3 documentation (tutorial, HOWTOs, FAQ, language reference, library "
        "reference, ...): its reStructuredText sources, cut into sections.",
        ["python3.11-doc"],
        "PSF License Version 2 (the Python documentation)",
        _python_docs),
    "perl-docs": Corpus(
        "perl-docs", "retention, not replayed",
        "The Perl 5 manual (perlintro, perlfaq, perlfunc, perlre, perlop, ...): its POD sources, "
        "cut into sections (release notes, the table of contents and perldiag left out). "
        "General programming text the model knew; not in any training mixture of the demo.",
        ["perl-doc"],
        "GPL-1+ or Artistic License 1.0 (Perl's own terms; see COPYRIGHT.perl-doc)",
        _perl_docs),
}


def _required_paths(name: str) -> list[str]:
    if name == "debian-manuals":
        return [DEBIAN_REFERENCE, DEBIAN_POLICY, DEVELOPERS_REFERENCE]
    if name == "perl-docs":
        root = perl_pod_root()
        return [root + "/perlintro.pod" if root else "/usr/share/perl/5/pod/perlintro.pod"]
    return [python_doc_root() or "/usr/share/doc/python3.11/html/_sources"]


# --- installing -----------------------------------------------------------------------------------

def _apt_install(packages: list[str], say) -> None:
    if shutil.which("apt-get") is None:
        raise CorpusError(f"install the Debian packages {' '.join(packages)} (apt-get not found)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise CorpusError(f"run as root, or first: sudo apt-get install --no-install-recommends "
                          f"{' '.join(packages)}")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say(f"installing {' '.join(packages)} with apt-get")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        say("apt-get install failed; running apt-get update and retrying")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise CorpusError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-500:]}")


def _python_doc_package() -> str:
    """The python3.X-doc this Debian release has (bookworm: 3.11)."""
    for pkg in ("python3.11-doc", "python3.13-doc", "python3.12-doc", "python3-doc"):
        r = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True)
        if r.returncode == 0 and re.search(r"Candidate: (?!\(none\))", r.stdout):
            return pkg
    return "python3-doc"


def ensure_packages(corpus: Corpus, install: bool, say) -> list[str]:
    missing = [p for p in _required_paths(corpus.name) if not os.path.exists(p)]
    packages = list(corpus.packages)
    if corpus.name == "python-docs" and missing:
        packages = [_python_doc_package()]
    if missing:
        if not install:
            raise CorpusError(f"{corpus.name}: {missing[0]} is missing; install "
                              f"{' '.join(packages)}")
        _apt_install(packages, say)
        missing = [p for p in _required_paths(corpus.name) if not os.path.exists(p)]
        if missing:
            raise CorpusError(f"{corpus.name}: {missing[0]} is still missing after installing "
                              f"{' '.join(packages)}")
    if corpus.name == "python-docs":
        packages = [_python_doc_package_of(python_doc_root())]
    return packages


def package_version(pkg: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def _copyright_file(pkg: str) -> str | None:
    p = f"/usr/share/doc/{pkg}/copyright"
    return p if os.path.isfile(p) else None


# --- writing --------------------------------------------------------------------------------------

def default_out() -> Path:
    return default_cache_dir() / "corpora"


def build_corpus(corpus: Corpus, out: Path, *, max_bytes: int, shards: int, install: bool,
                 force: bool, say=print) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest = out / corpus.name
    manifest_path = dest / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") == FORMAT_VERSION and manifest.get(
                "max_bytes") == max_bytes and manifest.get("shards") == shards:
            say(f"{corpus.name}: up to date in {dest}")
            return manifest
    packages = ensure_packages(corpus, install, say)
    docs, size = [], 0
    for doc_id, pkg, text in corpus.collect():
        text = text.strip()
        if not text:
            continue
        n = len(text.encode("utf-8"))
        if size + n > max_bytes and docs:
            break
        docs.append((doc_id, pkg, text))
        size += n
    if not docs:
        raise CorpusError(f"{corpus.name}: the packages hold no text")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for s in range(shards):  # round-robin, so every shard spans all the manuals
        part = docs[s::shards]
        table = pa.table({"text": [d[2] for d in part], "id": [d[0] for d in part],
                          "package": [d[1] for d in part]})
        pq.write_table(table, tmp / f"part-{s:05d}.parquet", compression="zstd")
    versions = {p: package_version(p) for p in packages}
    for p in packages:
        c = _copyright_file(p)
        if c:
            shutil.copyfile(c, tmp / f"COPYRIGHT.{p}")
    manifest = {
        "name": corpus.name, "role": corpus.role, "description": corpus.description,
        "packages": versions, "licence": corpus.licence, "documents": len(docs),
        "text_bytes": size, "shards": shards, "max_bytes": max_bytes,
        "format_version": FORMAT_VERSION, "columns": ["text", "id", "package"],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / "README.md").write_text(_readme(manifest))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    say(f"{corpus.name}: {len(docs)} documents, {size / 1e6:.1f} MB of text, {shards} shards "
        f"-> {dest}")
    return manifest


def _readme(m: dict) -> str:
    pkgs = "\n".join(f"- `{p}` {v} (its copyright file: `COPYRIGHT.{p}`)"
                     for p, v in m["packages"].items())
    return (f"# {m['name']} ({m['role']})\n\n{m['description']}\n\n"
            f"Built by `llamapro data corpora` from these Debian packages:\n\n{pkgs}\n\n"
            f"Licence: {m['licence']}. The text is the packages' own, unchanged except for being "
            f"cut into sections; the copyright files travel with it, and each manual's source "
            f"(its preferred form for modification) is in its Debian source package "
            f"(`apt-get source <package>`).\n\n"
            f"{m['documents']} documents, {m['text_bytes']:,} bytes of UTF-8 text, in "
            f"{m['shards']} parquet shards (columns: {', '.join(m['columns'])}).\n")


def build_corpora(out: str | os.PathLike | None = None, *, names: list[str] | None = None,
                  max_bytes: int = 3 << 20, shards: int = 4, install: bool = True,
                  force: bool = False, say=print) -> dict[str, dict]:
    """Build (or reuse) the demo corpora; return their manifests by name."""
    out = Path(out) if out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in names or list(CORPORA):
        if name not in CORPORA:
            raise CorpusError(f"no demo corpus {name!r}; choose from {', '.join(CORPORA)}")
        result[name] = build_corpus(CORPORA[name], out, max_bytes=max_bytes, shards=shards,
                                    install=install, force=force, say=say)
    lines = ["# llamapro demo corpora\n", "Built by `llamapro data corpora`; see each directory's "
             "README.md and COPYRIGHT.* files.\n"]
    for name, m in result.items():
        lines.append(f"- `{name}/` ({m['role']}): {m['documents']} documents, "
                     f"{m['text_bytes'] / 1e6:.1f} MB; licence: {m['licence']}")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return result
