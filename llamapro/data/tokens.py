"""Tokenizing and packing: the model's fast tokenizer shipped to Ray actors, token ids and labels of
raw text and of chat conversations, and packing documents into blocks of ``seq_len`` tokens."""

from __future__ import annotations

import itertools
import os
import pickle

import numpy as np

from llamapro import loading
from llamapro.errors import DataError

IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt tokens, padding): what HF models ignore."""


TOKENIZE_DOCS = 256      # documents per tokenizer call
TOKENIZE_BYTES = 1 << 20  # ... or fewer when they are big


class TokenizerBundle:
    """What a Ray actor needs of the model's tokenizer, cheap to ship and to load: the Rust
    tokenizer as JSON (loading it imports only ``tokenizers``), the EOS and padding ids, and the
    pickled HF tokenizer, unpickled only when instruction data needs the chat template (importing
    transformers costs an actor seconds)."""

    def __init__(self, hf_tokenizer):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DataError(
                f"{type(hf_tokenizer).__name__} is not a fast tokenizer: llamapro tokenizes inside "
                "Ray Data with the Rust tokenizer (the model directory needs a tokenizer.json)")
        self.eos = hf_tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no EOS token; packing needs one to separate "
                            "documents")
        self.pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos
        self.json = backend.to_str()
        try:
            self._hf_blob = pickle.dumps(hf_tokenizer)
        except Exception as e:  # only instruction data needs it; fail there, with the reason
            self._hf_blob, self._pickle_error = None, f"{type(e).__name__}: {e}"
        self._hf = hf_tokenizer
        self._backend = None

    def __getstate__(self):
        return {**self.__dict__, "_hf": None, "_backend": None}

    def backend(self):
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self.json)
        return self._backend

    def hf(self):
        if self._hf is None:
            if self._hf_blob is None:
                raise DataError("the tokenizer could not be shipped to the Ray actors for chat "
                                f"templates ({self._pickle_error})")
            self._hf = pickle.loads(self._hf_blob)
        return self._hf

    def decode(self, ids) -> str:
        return self.backend().decode([int(i) for i in ids], skip_special_tokens=False)


class Encoder:
    """Token ids and labels of documents, with the model's own fast tokenizer."""

    def __init__(self, tokenizer):
        self.bundle = tokenizer if isinstance(tokenizer, TokenizerBundle) else TokenizerBundle(
            tokenizer)
        self.backend = self.bundle.backend()
        self.eos, self.pad = self.bundle.eos, self.bundle.pad

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Raw text: the tokenizer's own added tokens (BOS where the model wants one), the text,
        EOS."""
        b = self.backend
        b.encode_special_tokens = True  # "<|im_end|>" written in a document is text, not a control
        try:
            fast = getattr(b, "encode_batch_fast", b.encode_batch)
            encs = fast(texts, add_special_tokens=True)
        finally:
            b.encode_special_tokens = False
        out = []
        for e in encs:
            ids = e.ids
            if not ids or ids[-1] != self.eos:
                ids.append(self.eos)
            out.append(ids)
        return out

    def render_chat(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as the chat template writes it, and the character spans of the
        assistant's replies (each up to and including its end-of-turn marker).

        The span of reply i is what rendering messages[:i+1] adds to rendering messages[:i] with
        the generation prompt, so it works for any template without ``{% generation %}`` markers;
        a template that rewrites earlier turns (not prefix-stable) raises ValueError.
        """
        tpl = self.bundle.hf().apply_chat_template
        full = tpl(messages, tokenize=False).rstrip()
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = tpl(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = tpl(messages[: i + 1], tokenize=False).rstrip()
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise ValueError("chat template is not prefix-stable")
            if len(upto) > len(prefix):
                spans.append((len(prefix), len(upto)))
        return full, spans

    def encode_chats(self, convs: list[list[dict]]) -> list[tuple[list[int], np.ndarray] | str]:
        """Instruction data: (ids, labels) per conversation, labels -100 outside the replies;
        or a skip reason."""
        rendered, idx, out = [], [], [None] * len(convs)
        for k, msgs in enumerate(convs):
            try:
                text, spans = self.render_chat(msgs)
            except Exception:  # jinja errors, a template that rejects the roles, ...
                out[k] = "template_error"
                continue
            rendered.append((text, spans, msgs[-1]["role"] == "assistant"))
            idx.append(k)
        if not rendered:
            return out
        self.backend.encode_special_tokens = False  # the template's markers are control tokens
        encs = self.backend.encode_batch([r[0] for r in rendered], add_special_tokens=False)
        for k, (text, spans, ends_with_reply), e in zip(idx, rendered, encs):
            ids = e.ids
            offs = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            keep = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                keep |= (offs[:, 0] >= a) & (offs[:, 1] <= b) & (offs[:, 1] > offs[:, 0])
            labels = np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)
            if not ids or ids[-1] != self.eos:
                ids.append(self.eos)  # the separator; learned only when it ends a reply
                labels = np.append(labels, self.eos if ends_with_reply else IGNORE_INDEX)
            if not keep.any():
                out[k] = "no_response"
                continue
            out[k] = (ids, labels)
        return out


# --- packing --------------------------------------------------------------------------------------

class Packer:
    """Concatenates documents (each already ending in EOS) into blocks of exactly ``seq_len``.

    ``add`` appends a document; ``pop_blocks`` returns every complete block so far as two
    (n, seq_len) int64 arrays and keeps the remainder for the next documents. The remainder at
    the end is either dropped (training: ``tail``) or padded (evaluation: ``pad_tail``).
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._ids: list = []
        self._labels: list = []
        self.pending = 0

    def add(self, ids, labels=None):
        """labels None means labels = ids (raw text)."""
        self._ids.append(ids)
        self._labels.append(labels)
        self.pending += len(ids)

    def _concat(self):
        ids = np.fromiter(itertools.chain.from_iterable(self._ids), dtype=np.int64,
                          count=self.pending)
        if all(lab is None for lab in self._labels):
            labels = ids.copy()
        else:
            labels = np.concatenate([np.asarray(i, dtype=np.int64) if lab is None else
                                     np.asarray(lab, dtype=np.int64)
                                     for i, lab in zip(self._ids, self._labels)])
        return ids, labels

    def pop_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.pending // self.seq_len
        if n == 0:
            return (np.empty((0, self.seq_len), np.int64),) * 2
        ids, labels = self._concat()
        cut = n * self.seq_len
        self._ids, self._labels = [ids[cut:]], [labels[cut:]]
        self.pending -= cut
        return ids[:cut].reshape(n, self.seq_len), labels[:cut].reshape(n, self.seq_len)

    def tail(self) -> int:
        """Drop the remainder (shorter than one block); return how many tokens that was."""
        n = self.pending
        self._ids, self._labels, self.pending = [], [], 0
        return n

    def pad_tail(self, pad_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The remainder as one block padded with ``pad_id`` (labels -100 on the padding)."""
        if self.pending == 0:
            return None
        ids, labels = self._concat()
        pad = self.seq_len - len(ids)
        self._ids, self._labels, self.pending = [], [], 0
        ids = np.concatenate([ids, np.full(pad, pad_id, np.int64)])
        labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, np.int64)])
        return ids[None, :], labels[None, :]


def load_tokenizer(tokenizer) -> TokenizerBundle:
    """A model directory or hub id (loaded by ``llamapro.loading``), a loaded fast tokenizer, or a
    bundle; checked here on the driver, so an unusable tokenizer fails before any actor starts."""
    if isinstance(tokenizer, TokenizerBundle):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = loading.load_tokenizer(tokenizer)
    return TokenizerBundle(tokenizer)
