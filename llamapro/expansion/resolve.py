"""Where a base model comes from: the demo alias, a local directory, or a hub id (downloaded)."""

from __future__ import annotations

from pathlib import Path

from llamapro.demo import resolve_model
from llamapro.errors import CheckpointError


def resolve_local(model: str) -> Path:
    """A base given as the demo alias, a local directory, or a hub id (downloaded when reachable)."""
    ref = resolve_model(model)
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{ref} is a file; give the model's directory")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                               "*.model", "*.jinja", "*.tiktoken"]))
        except Exception as e:  # offline, unknown repo, gated ...
            raise CheckpointError(f"{ref!r} is not a local directory and could not be fetched from "
                                  f"the hub ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"model path {ref!r} does not exist")
