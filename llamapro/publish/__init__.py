"""Publishing a trained run: the standard Hugging Face export and its portable and quantized
formats (GGUF, torchao, GPTQ/AWQ), the fused model (``fuse``, with a fusion strength chosen by the
regression gate), expansion packs (``pack`` / ``apply`` / ``strip --pack``), and the model card
each of them carries.

Files: ``source`` (a run or checkpoint checked against OUT, its model loaded, adapters merged),
``standard_dir`` (write a loaded model as a standard directory), ``card`` (every model card),
``export`` (``llamapro export`` and its formats), ``gguf`` / ``gguf_pretok``, ``quant``, ``fuse``,
and the ``pack`` package.
"""

from llamapro.errors import FuseError, GGUFExportError, NoAlphaPassesGate, PackError, QuantExportError
from llamapro.publish.card import data_mixture, gguf_card, model_card, pack_card
from llamapro.publish.export import FORMATS, export, export_format
from llamapro.publish.fuse import format_fusion, fuse, run_fuse
from llamapro.publish.gguf import export_gguf
from llamapro.publish.pack import (
    PackedModel,
    apply_packs,
    compose,
    load_packs_into,
    make_pack,
    read_base,
    read_pack,
    strip_pack,
)
from llamapro.publish.quant import export_gptq, export_torchao, heldout_windows, perplexity
from llamapro.publish.source import check_destination, find_adapter, load_merged
from llamapro.publish.standard_dir import write_standard_dir

__all__ = ["FORMATS", "FuseError", "GGUFExportError", "NoAlphaPassesGate", "PackError", "PackedModel",
           "QuantExportError", "apply_packs", "check_destination", "compose", "data_mixture", "export",
           "export_format", "export_gguf", "export_gptq", "export_torchao", "find_adapter", "format_fusion",
           "fuse", "gguf_card", "heldout_windows", "load_merged", "load_packs_into",
           "make_pack", "model_card", "pack_card", "perplexity", "read_base", "read_pack", "run_fuse",
           "strip_pack", "write_standard_dir"]
