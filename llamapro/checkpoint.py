"""Temporary re-exports while importers move: byte I/O is in ``llamapro.tensors``, metadata in
``llamapro.artifacts``, streaming expand/strip in ``llamapro.expand.streaming``. Deleted at the end
of the restructuring."""

from llamapro.artifacts import METADATA_VERSION, read_metadata, require_metadata, write_metadata  # noqa: F401
from llamapro.errors import CheckpointError  # noqa: F401
from llamapro.expand.streaming import (  # noqa: F401
    _data_ranges,
    check_new_blocks_zero,
    generation_lineage,
    stream_expand,
    stream_strip,
)
from llamapro.tensors import (  # noqa: F401
    INDEX_FILE,
    METADATA_FILE,
    WEIGHT_SUFFIXES,
    TensorInfo,
    atomic_dir,
    config_digest,
    content_digest,
    copy_side_files,
    fingerprint,
    fingerprint_of,
    read_config,
    read_header,
    tensor_digest,
    tensor_table,
    weight_files,
    write_json_atomic,
    write_tensor_dir,
    write_tensor_file,
)
