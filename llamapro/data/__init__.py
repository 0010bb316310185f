"""Ray Data pipeline: read sharded corpora, hold out eval documents, tokenize, pack, mix.

    ds = build_train_dataset(cfg.data, tokenizer_path)     # rows: input_ids, labels, source
    TorchTrainer(..., datasets={"train": ds})              # workers: get_dataset_shard("train")

How a block is made, top to bottom (one work unit = a few shards of one source):

1. **Read** each shard of the unit with its own parser (jsonl, parquet, plain text; gz/bz2/zst/lz4
   by extension; local disk or any pyarrow filesystem). Bad input is *skipped and counted* with a
   reason (``bad_json``, ``missing_field``, ``wrong_type``, ``bad_utf8``, ``empty``,
   ``too_large``, ``bad_messages``, ``template_error``, ``no_response``; whole files:
   ``unreadable_file``), never raised.
2. **Split**: a document is held out for evaluation when a keyed hash of its content falls under
   the source's ``eval_fraction`` (``is_held_out``): stable across runs, independent of shard
   order, and duplicates always land on the same side, so no held-out text reaches training.
3. **Tokenize** with the model's own fast tokenizer. Raw text: the tokenizer's own special tokens
   (a BOS for Llama-style models) + the text + EOS; labels are the input ids; strings that look
   like special tokens (``<|im_end|>`` inside a web page) are read as plain text, never as control
   tokens. Instruction data: rendered with the model's chat template; labels are -100 except on
   the assistant's replies, their end-of-turn token included.
4. **Pack** the documents of one source back to back (each ends with EOS) into blocks of exactly
   ``seq_len`` tokens (``Packer``). A document may continue into the next block, and attention
   is not masked at document boundaries: the usual trade of pretraining packing (no padding
   waste; a token may attend to an unrelated earlier document, separated by EOS). For training,
   the tail of a work unit shorter than one block is dropped (counted as
   ``tail_tokens_dropped``); for evaluation it is padded with labels -100 so every held-out
   token is scored exactly once.
5. **Mix**: every block is kept a number of times drawn from its source's rate by a keyed hash
   of (seed, source, unit, block index), so the set of training blocks is a pure function of the
   corpus, the config and the seed. Rates make each source's share of training *tokens* match its
   weight, from sizes estimated before the run on a sample of each source (``data.mixing``:
   downsample thins the plentiful sources, upsample repeats the scarce ones in later passes).

Steps 1-5 run inside one Ray Data actor pool (``compute=ActorPoolStrategy``): each actor loads
the tokenizer once and turns one work unit at a time into packed blocks, which stream to the
consumers (``streaming_split`` under Ray Train); nothing is materialized. Skip counts go to a
small stats actor; when the last unit of a source has been read, the pipeline raises
``DataError`` if the source yielded nothing or skipped more than ``data.max_skip_fraction`` of its
documents or files. ``preview`` runs the same pipeline without that check and reports the counts.

Where each part lives: ``sources`` (paths, formats, readers: step 1), ``split`` (step 2),
``tokens`` (tokenizer, encoder, packer: steps 3-4), ``mixture`` (rates, block copies, size
estimates: step 5), ``units`` (work units and their order), ``blocks`` (steps 1-5 on one unit),
``counts`` (counts and the skip budget), ``dataset`` (the Ray Data pipeline), ``preview``
(``llamapro data preview``), ``corpora`` (the demo corpora). This module re-exports the names other
packages and the tests use.
"""

from __future__ import annotations

from llamapro.data.blocks import process_unit, read_guarded
from llamapro.data.counts import check_source, merge_counts, new_counts, record_skip
from llamapro.data.dataset import Plan, build_dataset, build_eval_dataset, build_train_dataset
from llamapro.data.mixture import block_copies, estimate_tokens, mixture_rates
from llamapro.data.preview import format_preview, preview
from llamapro.data.sources import (
    COMPRESSION,
    EXTENSIONS,
    SKIP_REASONS,
    FileRef,
    Reader,
    conversation,
    demo_corpus_dir,
    extract,
    format_of,
    read_errors,
    resolve_paths,
)
from llamapro.data.split import doc_key, is_held_out
from llamapro.data.tokens import IGNORE_INDEX, Encoder, Packer, TokenizerBundle, load_tokenizer
from llamapro.data.units import Unit, interleave, plan_units
from llamapro.errors import DataError, DataPathError

__all__ = [
    "COMPRESSION", "EXTENSIONS", "IGNORE_INDEX", "SKIP_REASONS", "DataError", "DataPathError",
    "Encoder", "FileRef", "Packer", "Plan", "Reader", "TokenizerBundle", "Unit", "block_copies",
    "build_dataset", "build_eval_dataset", "build_train_dataset", "check_source", "conversation",
    "demo_corpus_dir", "doc_key", "estimate_tokens", "extract", "format_of", "format_preview",
    "interleave", "is_held_out", "load_tokenizer", "merge_counts", "mixture_rates", "new_counts",
    "plan_units", "preview", "process_unit", "read_errors", "read_guarded", "record_skip",
    "resolve_paths",
]
