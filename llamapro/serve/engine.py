"""The engines behind a model deployment: tokenization and the context check (``_Tokenizing``), the
continuous-batching PyTorch token loop (``TransformersEngine``) and vLLM's engine (``VLLMEngine``).

No Ray here: a model replica (``llamapro.serve.deployments.ModelServerImpl``) owns one engine;
benchmarks and tests drive an engine in-process. Failures never strand a request: every row an engine took is
either finished, cancelled, or handed an ``APIError`` (500/503) through its ``emit`` callback.
"""

import collections
import concurrent.futures
import importlib.util
import logging
import queue
import secrets
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro.demo import resolve_model
from llamapro.loading import (
    cache_kwarg,
    load_config,
    load_model,
    load_tokenizer,
    output_cache,
    resolve_device,
    torch_dtype,
)
from llamapro.serve.protocol import APIError, _bad

log = logging.getLogger("ray.serve")


def engine_error(e: BaseException) -> APIError:
    """The client-facing error for a failed prefill or decode step (its rows fail, the engine
    keeps serving): 503 when it ran out of memory (a retry, or a smaller request, can pass),
    500 otherwise; the message names the cause without a traceback."""
    text = str(e).splitlines()[0][:200] if str(e) else ""
    oom = type(e).__name__ == "OutOfMemoryError" or any(
        s in text.lower() for s in ("out of memory", "can't allocate memory", "cannot allocate"))
    if oom:
        return APIError(503, "The model ran out of memory for this batch; retry later, or send a "
                        "shorter prompt or a smaller max_tokens.", type="server_error",
                        code="engine_out_of_memory")
    return APIError(500, f"Generation failed on the server ({type(e).__name__}: {text}). The "
                    "request was dropped; the server keeps serving.", type="server_error",
                    code="engine_error")


@dataclass
class Prepared:
    """A validated, tokenized request inside a model replica."""

    ids: list
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int | None
    ignore_eos: bool
    stream: bool = True
    """False: only the final event is emitted, carrying the whole text (no per-token wake-ups)."""
    cancelled: bool = False
    pack: str = ""
    """The expansion pack this row runs with ("" = the base); see ``llamapro.serve.packs``."""
    batch_size: int = 0
    emit: Any = None
    """Called from the engine thread with each event dict (or the exception that ended it)."""


class _Row:
    """Per-request generation state: tokens, incremental detokenization, stop strings, sampler."""

    def __init__(self, p: Prepared, engine):
        import torch

        self.p, self.engine = p, engine
        self.out: list[int] = []
        self.acc: list[str] = []  # text so far, for non-streaming requests
        self.n = 0
        self.emitted = 0
        self.finish: str | None = None
        self.solo = False  # prefill alone: a group prefill with it failed
        self.maxstop = max((len(s) for s in p.stop), default=0)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        self.gen = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)

    def emit(self, item) -> None:
        if self.p.emit is not None:
            self.p.emit(item)

    def uniform(self) -> float:
        import torch

        return torch.rand(1, generator=self.gen).item()

    def push(self, tok: int) -> dict:
        self.n += 1
        eos = tok in self.engine.eos_ids and not self.p.ignore_eos
        if not eos:
            self.out.append(tok)
        text = self.engine.decode(self.out)
        final = eos or self.n >= self.p.max_tokens
        cut = None
        if self.p.stop:
            start = max(0, self.emitted - self.maxstop + 1)
            hits = [i for i in (text.find(s, start) for s in self.p.stop) if i >= 0]
            if hits:
                cut = max(min(hits), self.emitted)
        if cut is not None:
            text, final, self.finish = text[:cut], True, "stop"
        elif eos:
            self.finish = "stop"
        elif final:
            self.finish = "length"
        if final:
            safe = len(text)
        else:
            safe = len(text)
            while safe > self.emitted and text[safe - 1] == "\ufffd":  # half a UTF-8 character
                safe -= 1
            for k in range(min(self.maxstop - 1, safe - self.emitted), 0, -1):
                if any(s.startswith(text[safe - k:safe]) for s in self.p.stop):
                    safe -= k  # might be the start of a stop string: hold it back
                    break
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return {"text": delta, "finish_reason": self.finish, "completion_tokens": self.n}


class _Tokenizing:
    """Shared by engines: chat template, tokenization and the context check."""

    tok: Any
    context: int

    def _init_tokenizer(self, path: str, trust_remote_code: bool):
        self.tok = load_tokenizer(path, trust_remote_code=trust_remote_code)

    def prepare(self, req: dict) -> Prepared:
        if req["kind"] == "chat":
            if not getattr(self.tok, "chat_template", None):
                raise _bad("messages", "this model has no chat template; use /v1/completions")
            try:
                text = self.tok.apply_chat_template(req["messages"], add_generation_prompt=True,
                                                    tokenize=False)
            except Exception as e:  # the template's own checks (e.g. role alternation)
                raise _bad("messages", f"the chat template rejected the messages: {e}") from None
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        elif isinstance(req["prompt"], str):
            ids = list(self.tok(req["prompt"])["input_ids"])
        else:
            ids = list(req["prompt"])
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise _bad("prompt", f"token ids must be in [0, {self.vocab_size})")
        if not ids:
            raise _bad("prompt", "the prompt is empty")
        if req["kind"] == "chat" or isinstance(req["prompt"], str):
            top = max(ids)
            if top >= self.vocab_size:  # the server's tokenizer and weights disagree, not the client
                raise APIError(500, f"The tokenizer produced token id {top}, beyond this model's "
                               f"{self.vocab_size} embeddings: the model's tokenizer and weights do "
                               "not match (resize the embeddings when adding tokens).",
                               type="server_error", code="tokenizer_model_mismatch")
        n = len(ids)
        if n >= self.context:
            raise _bad("messages" if req["kind"] == "chat" else "prompt",
                       f"This model's maximum context length is {self.context} tokens. However, "
                       f"your prompt has {n} tokens.", code="context_length_exceeded")
        mt = req["max_tokens"]
        if mt is None:
            mt = min(req["default_max_tokens"], self.context - n)
        elif n + mt > self.context:
            raise _bad("max_tokens", f"This model's maximum context length is {self.context} tokens. "
                       f"However, you requested {n + mt} tokens ({n} in the prompt, {mt} for the "
                       "completion). Please reduce the prompt or max_tokens.",
                       code="context_length_exceeded")
        return Prepared(ids=ids, max_tokens=mt, temperature=req["temperature"], top_p=req["top_p"],
                        stop=list(req["stop"]), seed=req["seed"], ignore_eos=req["ignore_eos"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class TransformersEngine(_Tokenizing):
    """Continuous batching with a plain PyTorch token loop (KV cache, left padding, per-row params).

    One engine thread owns the model. ``submit`` hands it a group of requests (a ``@serve.batch``
    batch); the thread prefills a group in one forward pass and merges it into the running batch at
    the next token, so a request never waits for a whole earlier batch to finish. At most
    ``max_running`` rows run at once; the rest wait their turn. Each row has its own temperature /
    top_p / seed (a private torch.Generator, so a seeded request gives the same text whatever it is
    batched with), max_tokens, stop strings and EOS; finished or cancelled rows leave the batch and
    the KV cache at once. Events go to each request's ``emit`` callback."""

    continuous = False  # admitted through @serve.batch; see ModelServerImpl._admit

    def __init__(self, path: str, *, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, max_context: int = 0, max_running: int = 8,
                 threads: int = 0):
        import torch

        self.torch = torch
        self.device = torch.device(resolve_device(device))
        tdtype = torch_dtype(dtype, cuda=self.device.type == "cuda")  # auto: bf16 on GPU, else fp32
        self._init_tokenizer(path, trust_remote_code)
        # a local directory's weights are checked first (safetensors only); a hub id cannot be
        self.model = load_model(path, dtype=tdtype, device=str(self.device),
                                trust_remote_code=trust_remote_code,
                                check_weights=Path(path).is_dir())
        cfg = self.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        emb = self.model.get_input_embeddings()
        self.vocab_size = int(getattr(emb, "num_embeddings", 0)
                              or getattr(text_cfg, "vocab_size", 0) or len(self.tok))
        ctx = max_context or getattr(text_cfg, "max_position_embeddings", 0) or 0
        if not ctx and 0 < getattr(self.tok, "model_max_length", 0) < 10**7:
            ctx = self.tok.model_max_length
        self.context = int(ctx or 2048)
        eos = set()
        for src in (getattr(self.model.generation_config, "eos_token_id", None),
                    getattr(text_cfg, "eos_token_id", None), self.tok.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_ids = eos
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)
        self.dtype = str(tdtype).replace("torch.", "")
        self.max_running = max_running
        self.threads = threads
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self.counters = {"finished": 0, "cancelled": 0, "failed": 0}
        self.packs = None  # a ServePacks when this model serves expansion packs
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._reset()

    # --- public, any thread
    def submit(self, batch: list) -> None:
        """Queue a group of Prepared requests (each with ``emit``) for admission."""
        self._start()
        self._inbox.put(list(batch))

    def call(self, fn) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread once the running batch is empty (no new row
        is admitted meanwhile): for changes of the model's layers, which the KV cache of a running
        batch could not follow. The future holds its result or exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, fut))
        self._start()
        self._inbox.put([])  # wake the thread if it waits for work
        return fut

    def _start(self):
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve_forever, daemon=True,
                                                name="llamapro-engine")
                self._thread.start()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def generate(self, batch: list) -> list[dict]:
        """Blocking helper (benchmarks, scripts): run requests to completion, return final events
        with the full text."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        texts = [[] for _ in batch]
        for i, p in enumerate(batch):
            p.emit = (lambda i: lambda item: q.put((i, item)))(i)
        self.submit(batch)
        done, out = 0, [None] * len(batch)
        while done < len(batch):
            i, item = q.get()
            if isinstance(item, BaseException):
                raise item
            texts[i].append(item["text"])
            if item["finish_reason"]:
                out[i] = {**item, "text": "".join(texts[i]), "prompt_tokens": len(batch[i].ids)}
                done += 1
        return out

    # --- engine thread
    def stats(self) -> dict:
        """Rows running in the batch and waiting for it, and what became of rows so far (finished,
        cancelled by their caller, failed). Approximate when read from another thread."""
        return {"running": len(self._rows), "pending": len(self._pending) + self._inbox.qsize(),
                **self.counters}

    def _reset(self):
        self._rows: list[_Row] = []
        self._taking: list[_Row] = []
        self._cache = self._attn = self._pos = self._logits = None
        self._mergeable = False

    def _serve_forever(self):
        torch = self.torch
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                block = not self._rows and not self._pending
                try:
                    while True:
                        group = self._inbox.get(block=block)
                        block = False
                        self._pending.extend(_Row(p, self) for p in group)
                except queue.Empty:
                    pass
                if not self._rows and not self._calls.empty():
                    self._run_calls()
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as e:  # a failed step: its rows fail, the engine keeps serving
                    log.exception("generation failed; failing the %d request(s) of the batch",
                                  len(self._rows) + len(self._taking))
                    self._fail(self._rows + self._taking, e)
                    self._reset()

    def pending_packs(self) -> set:
        """Packs of the rows waiting for admission (engine thread)."""
        return {r.p.pack for r in self._pending}

    def _run_calls(self):
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self))
                except BaseException as e:
                    fut.set_exception(e)

    def _gate(self, rows: list) -> None:
        if self.packs is not None:
            self.packs.select([r.p.pack for r in rows], self.device)

    def _fail(self, rows: list, e: BaseException) -> None:
        err = engine_error(e)
        for r in {id(r): r for r in rows}.values():
            self.counters["failed"] += 1
            r.emit(err)

    def _forward(self, **kw):
        try:  # only the last position's logits: a prompt's full-vocabulary logits are wasted work
            return self.model(use_cache=True, logits_to_keep=1, **kw)
        except TypeError:  # remote code without logits_to_keep
            return self.model(use_cache=True, **kw)

    def _admit(self) -> list:
        torch = self.torch
        room = self.max_running - len(self._rows)
        if room <= 0 or not self._pending or (self._rows and not self._mergeable) \
                or not self._calls.empty():  # a layer change waits for the batch to drain
            return []
        new = self._taking = []  # rows taken off the queue: failed, not lost, if the step raises
        while self._pending and len(new) < room:
            r = self._pending.popleft()
            if r.p.cancelled:  # the caller left while it waited
                self.counters["cancelled"] += 1
                continue
            if r.solo and new:
                self._pending.appendleft(r)
                break
            new.append(r)
            if r.solo:
                break
        if not new:
            return []
        L = max(len(r.p.ids) for r in new)
        ids = torch.full((len(new), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(new), L), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, L - len(r.p.ids):] = torch.tensor(r.p.ids, dtype=torch.long)
            attn[i, L - len(r.p.ids):] = 1
        pos = (attn.cumsum(-1) - 1).clamp_(min=0)
        ids, attn, pos = ids.to(self.device), attn.to(self.device), pos.to(self.device)
        try:
            self._gate(new)
            out = self._forward(input_ids=ids, attention_mask=attn, position_ids=pos)
        except Exception as e:  # the prefill of the new rows failed; the running batch is intact
            self._taking = []
            if len(new) > 1:  # find the culprit: prefill each row alone (also what an OOM needs)
                log.warning("prefill of %d requests failed (%s); retrying them one at a time",
                            len(new), type(e).__name__)
                for r in reversed(new):
                    r.solo = True
                    self._pending.appendleft(r)
                return []
            log.exception("prefill failed")
            self._fail(new, e)
            return []
        cache, logits, next_pos = output_cache(out), out.logits[:, -1, :], pos[:, -1] + 1
        if not self._rows:
            self._cache, self._attn, self._pos, self._logits = cache, attn, next_pos, logits
            # Merging later groups means editing K/V tensors directly: only for plain dynamic
            # layers (sliding-window or linear-attention caches get admitted when the batch drains).
            self._mergeable = all(type(layer).__name__ == "DynamicLayer"
                                  for layer in getattr(cache, "layers", [None]))
        else:
            self._merge(cache, attn, next_pos, logits)
        self._rows.extend(new)
        self._taking = []
        for r in self._rows:
            r.p.batch_size = max(r.p.batch_size, len(self._rows))
        return new

    def _merge(self, cache, attn, next_pos, logits):
        """Append rows to the running batch: left-pad the shorter of the two KV caches."""
        torch, F = self.torch, self.torch.nn.functional
        T, Tn = self._attn.shape[1], attn.shape[1]
        for old, new in zip(self._cache.layers, cache.layers):
            ko, vo, kn, vn = old.keys, old.values, new.keys, new.values
            if T < Tn:
                ko, vo = F.pad(ko, (0, 0, Tn - T, 0)), F.pad(vo, (0, 0, Tn - T, 0))
            elif Tn < T:
                kn, vn = F.pad(kn, (0, 0, T - Tn, 0)), F.pad(vn, (0, 0, T - Tn, 0))
            old.keys, old.values = torch.cat([ko, kn]), torch.cat([vo, vn])
        a = F.pad(self._attn, (max(0, Tn - T), 0))
        b = F.pad(attn, (max(0, T - Tn), 0))
        self._attn = torch.cat([a, b])
        self._pos = torch.cat([self._pos, next_pos])
        self._logits = torch.cat([self._logits, logits])

    def _step(self):
        """Sample one token for every running row, emit, drop finished rows, run one decode step."""
        torch = self.torch
        rows = self._rows
        toks = self._sample(self._logits, rows)
        for r, t in zip(rows, toks):
            ev = r.push(t)
            if r.p.stream:
                r.emit(ev)
            else:
                r.acc.append(ev["text"])
                if ev["finish_reason"]:
                    r.emit({**ev, "text": "".join(r.acc)})
        keep = [j for j, r in enumerate(rows) if r.finish is None and not r.p.cancelled]
        for r in rows:
            if r.finish is not None:
                self.counters["finished"] += 1
            elif r.p.cancelled:
                self.counters["cancelled"] += 1
        if not keep:
            self._reset()
            return
        if len(keep) < len(rows):
            sel = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._cache.batch_select_indices(sel)
            self._attn, self._pos = self._attn[sel], self._pos[sel]
            self._rows = [rows[j] for j in keep]
            if self._mergeable:  # drop columns that are padding for every remaining row
                first = int(self._attn.any(0).nonzero()[0])
                if first:
                    self._attn = self._attn[:, first:]
                    for layer in self._cache.layers:
                        layer.keys = layer.keys[:, :, first:]
                        layer.values = layer.values[:, :, first:]
        feed = torch.tensor([toks[j] for j in keep], dtype=torch.long, device=self.device)
        self._attn = torch.cat([self._attn, self._attn.new_ones((len(keep), 1))], dim=1)
        self._gate(self._rows)
        out = self.model(input_ids=feed[:, None], attention_mask=self._attn,
                         position_ids=self._pos[:, None], use_cache=True,
                         **cache_kwarg(self.model, self._cache))
        self._cache, self._logits = output_cache(out), out.logits[:, -1, :]
        self._pos = self._pos + 1

    def _sample(self, logits, rows: list) -> list[int]:
        torch = self.torch
        out = logits.argmax(-1)
        sampled = [j for j, r in enumerate(rows) if r.p.temperature > 1e-5]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([rows[j].p.temperature for j in sampled], device=logits.device)
            probs = torch.softmax(logits[idx].float() / temps[:, None], dim=-1)
            u = torch.tensor([rows[j].uniform() for j in sampled], device=logits.device)
            top_p = torch.tensor([rows[j].p.top_p for j in sampled], device=logits.device)
            if bool((top_p < 1.0).any()):
                probs, order = probs.sort(dim=-1, descending=True)
                cum = probs.cumsum(-1)
                drop = cum - probs >= top_p[:, None]
                drop[:, 0] = False  # the most likely token always stays (top_p 0 = greedy)
                probs = probs.masked_fill(drop, 0.0)
            else:
                order = None
            cdf = probs.cumsum(-1)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            pick = pick.clamp_(max=cdf.shape[-1] - 1)
            tok = order.gather(-1, pick) if order is not None else pick
            out[idx] = tok.squeeze(-1)
        return out.tolist()


class VLLMEngine(_Tokenizing):
    """vLLM's AsyncLLMEngine, continuous batching on a GPU. Selected by ``engine: auto`` when the
    replica sees a GPU and vllm imports. UNTESTED in llamapro's CI (no GPU there)."""

    continuous = True

    def __init__(self, path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 max_context: int = 0, extra: dict | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self._init_tokenizer(path, trust_remote_code)
        eargs = AsyncEngineArgs(model=path, dtype=dtype, trust_remote_code=trust_remote_code,
                                max_model_len=max_context or None, **(extra or {}))
        self.llm = AsyncLLMEngine.from_engine_args(eargs)
        self.vocab_size = len(self.tok)
        self.context = max_context or int(getattr(self.tok, "model_max_length", 0) or 0)
        if not 0 < self.context < 10**7:
            c = load_config(path, trust_remote_code=trust_remote_code)
            self.context = int(getattr(c, "max_position_embeddings", 0) or 2048)
        self.dtype = dtype

    async def stream(self, p: Prepared):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                stop=p.stop or None, seed=p.seed, ignore_eos=p.ignore_eos)
        p.batch_size = 0  # continuous batching: no fixed batch
        sent = ""
        async for res in self.llm.generate({"prompt_token_ids": p.ids}, params,
                                           request_id=uuid.uuid4().hex):
            o = res.outputs[0]
            delta, sent = o.text[len(sent):], o.text
            yield {"text": delta, "finish_reason": o.finish_reason if res.finished else None,
                   "completion_tokens": len(o.token_ids)}


def select_engine(engine: str) -> str:
    """auto -> vllm only if this process sees a GPU and vllm is importable."""
    if engine != "auto":
        return engine
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    return "vllm" if cuda and importlib.util.find_spec("vllm") is not None else "transformers"


def load_engine(spec: dict):
    path = resolve_model(spec["path"])
    packs = spec.get("packs") or {}
    kind = "transformers" if packs and spec["engine"] == "auto" else select_engine(spec["engine"])
    if kind == "vllm" and packs:
        raise RuntimeError(f"serve.models.{spec['name']}: packs are served by the transformers "
                           "engine only; set engine: transformers (or auto)")
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(f"serve.models.{spec['name']}.engine=vllm but vllm is not installed "
                               "on this replica; use engine: transformers or install vllm")
        return VLLMEngine(path, dtype=spec["dtype"], trust_remote_code=spec["trust_remote_code"],
                          max_context=spec["max_context"], extra=spec.get("vllm"))
    engine = TransformersEngine(path, dtype=spec["dtype"], device=spec["device"],
                                trust_remote_code=spec["trust_remote_code"],
                                max_context=spec["max_context"], threads=spec["threads"])
    if packs:
        from llamapro.serve.packs import ServePacks, pack_paths

        engine.packs = ServePacks(engine.model, path, pack_paths(packs))
    return engine
