"""Expansion packs: what a llamapro run learned, as a small artifact of its own.

With the originals frozen, a trained expansion differs from its base only in the inserted blocks.
A pack holds exactly those: ``blocks.safetensors`` (the blocks' tensors, named as in the trained
model), ``pack.json`` (insertion map, the base's fingerprint and config digest, the trained
model's config and fingerprint, the training lineage) and a model card ``README.md``.

``apply BASE PACK [PACK ...] OUT`` streams a standard HF checkpoint from the base and the packs
(no tensor is materialised). Each pack must fit where it goes, by fingerprint:

* **stacked**: its recorded base is the model built so far (the first pack on its base; a
  generation-2 pack on the generation-1 model it was grown from). Its blocks go exactly where
  they were trained, and the config is the trained model's: one pack on its base gives back the
  trained model, tensors and config.
* **sibling**: its recorded base is BASE itself, while other packs are already applied. Each of
  its blocks goes into the same gap between original layers it was trained in, after the blocks
  already there (so the order of the command line decides).

The output's ``llamapro.json`` keeps every pack (its positions in the final model, its own
positions, its config), so ``strip --pack NAME`` removes any one of them and writes exactly what
``apply`` of the others would have written. A pack that another was stacked on cannot be removed
under it.

Adapters (LoRA on the new blocks): training merges them into the blocks when the run ends, and a
checkpoint that still carries a PEFT adapter is merged before packing, so a pack always holds
plain block weights (one format to apply, stack and serve; the blocks are small either way).

Files: ``sources`` (a base or pack read as layers of tensors), ``compose`` (where every layer
goes), ``make`` (``llamapro pack``), ``apply`` (``apply`` and ``strip --pack``), ``memory`` (one
base with several packs loaded, for Serve). The card is :func:`llamapro.publish.card.pack_card`.
No torch at module level (only the merge of an adapter and :func:`load_packs_into` need it).
"""

from llamapro.errors import PackError
from llamapro.publish.pack.apply import apply_packs, prove_base, strip_pack
from llamapro.publish.pack.compose import Composition, compose, table_of
from llamapro.publish.pack.make import make_pack
from llamapro.publish.pack.memory import PackedModel, load_packs_into
from llamapro.publish.pack.sources import (
    BLOCKS_FILE,
    PACK_FILE,
    PACK_FORMAT,
    PACK_VERSION,
    Base,
    PackSource,
    read_base,
    read_pack,
)

__all__ = ["BLOCKS_FILE", "PACK_FILE", "PACK_FORMAT", "PACK_VERSION", "Base", "Composition", "PackError",
           "PackSource", "PackedModel", "apply_packs", "compose", "load_packs_into", "make_pack",
           "prove_base", "read_base", "read_pack", "strip_pack", "table_of"]
