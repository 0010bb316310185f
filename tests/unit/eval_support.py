"""Builders shared by the eval / report / export unit tests (no tests here).

A "run" is built the way training leaves one, without Ray: a tiny Llama with a real (character
level) tokenizer is expanded by the real `llamapro expand` path, its inserted blocks are given
weights (as training would), it is saved with training metadata beside a metrics.jsonl.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from llamapro.artifacts import read_metadata, write_metadata
from llamapro.expansion import api as steps
from llamapro.tensors import copy_side_files
from tests.tiny_models import tiny_model

SEQ = 24
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer(out: Path, chat: bool = False):
    """A real tokenizers-backed fast tokenizer over 125 characters (vocab 128, like the tiny
    models): ids 0-2 are <pad>, <s>, </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    chars += [chr(c) for c in range(0xC0, 0xC0 + 128 - 3 - len(chars))]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="?")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def make_base(root: Path, chat: bool = False) -> Path:
    base = root / "base"
    if not base.exists():
        tiny_model("llama", num_layers=4).save_pretrained(base)
        char_tokenizer(base, chat)
    return base


def expanded(root: Path, chat: bool = False) -> Path:
    exp = root / "exp"
    if not exp.exists():
        steps.expand(str(make_base(root, chat)), str(exp), blocks=2, strategy="even",
                     progress=False, verify=False)
    return exp


def make_run(root: Path, name: str = "run", perturb: float = 0.0, seed: int = 1,
             metrics: bool = True, chat: bool = False) -> Path:
    """RUN/model (kind trained, originals frozen) + RUN/metrics.jsonl. ``perturb`` is the std of
    noise added to every parameter of the inserted blocks (0: still exactly the base)."""
    from llamapro.loading import load_model

    exp = expanded(root, chat)
    run = root / name
    if run.exists():
        shutil.rmtree(run)
    (run / "model").mkdir(parents=True)
    meta = read_metadata(exp)
    model = load_model(exp, dtype="float32", eval_mode=False)
    g = torch.Generator().manual_seed(seed)
    if perturb:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if any(n.startswith(f"model.layers.{i}.") for i in meta["new_layer_indices"]):
                    p.add_(torch.randn(p.shape, generator=g) * perturb)
    model.save_pretrained(run / "model")
    copy_side_files(exp, run / "model")
    new = meta["new_layer_indices"]
    meta = dict(meta, kind="trained")
    meta["training"] = {
        "mode": "llamapro", "config": {}, "steps": 8, "tokens": 8 * 4 * 2 * SEQ,
        "train_seconds": 4.0, "early_stopped_stages": [], "best_eval_loss": 4.1,
        "originals_frozen": True, "trained_from": str(exp),
        "stages": [{"index": 0, "name": "bottom", "layers": new[:1], "steps": 3},
                   {"index": 1, "name": "top", "layers": new, "steps": 5}],
        "data": {"sources": [{"name": "domain", "weight": 0.7, "paths": ["demo:debian-manuals"]},
                             {"name": "retention", "weight": 0.3, "paths": ["demo:python-docs"]}]},
    }
    write_metadata(run / "model", meta)
    if metrics:
        ev = []
        for k, st in enumerate(meta["training"]["stages"]):
            ev.append({"event": "stage_start", "stage": k, "name": st["name"], "layers": st["layers"],
                       "steps": st["steps"], "trainable_params": 1000 * (k + 1), "total_params": 50000})
        for s in range(1, 9):
            k = 0 if s <= 3 else 1
            ev.append({"event": "step", "step": s, "stage": k, "loss": 5.0 - 0.1 * s,
                       "tokens": s * 4 * 2 * SEQ, "tokens_per_s": 40.0 + s, "step_s": 0.5,
                       "lr": {"new_x1": 1e-3}})
            if s % 4 == 0:
                ev.append({"event": "eval", "step": s, "stage": k,
                           "eval_loss": {"domain": 4.9 - 0.05 * s, "retention": 4.8}})
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    return run


def counting_blocks(n: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = np.array([[(int(rng.integers(3, 60)) + j) % 100 + 3 for j in range(SEQ)] for _ in range(n)])
    labels = ids.copy()
    labels[:, : SEQ // 4] = -100  # a masked prefix, as packing leaves for instruct data
    return {"input_ids": ids, "labels": labels}


def greedy_blocks(model_dir: Path, n: int = 4, seed: int = 0, skip=None) -> dict:
    """Blocks the model at ``model_dir`` itself would write (its greedy continuations of random
    starts): it scores them well, and any other model scores them worse. With ``skip`` the
    given layers are skipped (the base of an expanded model)."""
    from llamapro.expansion.surgery import skip_layers
    from llamapro.loading import load_model

    m = load_model(model_dir, dtype="float32")
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, 128, (n, 4), generator=g)
    with torch.no_grad():
        if skip:
            with skip_layers(m, skip):
                out = m.generate(input_ids=start, max_new_tokens=SEQ - 4, min_new_tokens=SEQ - 4,
                               do_sample=False, pad_token_id=0)
        else:
            out = m.generate(input_ids=start, max_new_tokens=SEQ - 4, min_new_tokens=SEQ - 4,
                               do_sample=False, pad_token_id=0)
    ids = out.numpy()
    labels = ids.copy()
    labels[:, :4] = -100  # score the model's own continuation, not the random start
    return {"input_ids": ids, "labels": labels}


def eval_cli(argv) -> int:
    """`llamapro` with only the eval step's commands (eval, export, ...), in-process: its exit code."""
    import argparse

    from llamapro.cli.eval import add_eval_commands

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    add_eval_commands(sub)
    a = p.parse_args(argv)
    return a.fn(a)
