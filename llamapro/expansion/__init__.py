"""Block expansion (LLaMA-Pro): grow a decoder LLM deeper with new blocks that start as exact
identities, prove it, and strip them again.

One job per module, bottom to top:

- ``strategies``: where the new blocks go (a :class:`Placement`);
- ``families``: per-architecture knowledge (residual writers, per-layer config keys), key plans;
- ``streaming``: expand / strip a safetensors checkpoint on disk, byte ranges only (no torch);
- ``structure``: transformers builds the new config on the meta device: every layer has the tensors
  of its source (cached, run in a child process beside the copy);
- ``surgery``: the same expansion on a loaded model, and the numerical identity check (torch);
- ``proof``: the identity proof of a checkpoint on real prompts, and the gate that refuses to train
  an unproven one;
- ``resolve``: a base given as the demo alias, a directory or a hub id;
- ``api``: the steps `llamapro expand / verify / strip` call.

Importing this package is cheap (no torch, no ray); ``surgery`` imports torch.
"""

from llamapro.expansion.api import dumps, expand, strip, summary
from llamapro.expansion.families import Family, family_for, supported_model_types
from llamapro.expansion.proof import DEFAULT_PROMPTS, require_proven, verify_checkpoint
from llamapro.expansion.resolve import resolve_local
from llamapro.expansion.strategies import STRATEGIES, Placement, PlacementError, plan, validate_positions
from llamapro.expansion.streaming import generation_lineage, stream_expand, stream_strip

__all__ = [
    "DEFAULT_PROMPTS", "STRATEGIES", "Family", "Placement", "PlacementError", "dumps", "expand",
    "family_for", "generation_lineage", "plan", "require_proven", "resolve_local", "stream_expand",
    "stream_strip", "strip", "summary", "supported_model_types", "validate_positions",
    "verify_checkpoint",
]
