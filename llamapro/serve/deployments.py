"""The model deployment: a shim between the engine (``llamapro.serve.engine``) and the ingress.

One ``model-<name>`` deployment per model: tokenizing, the chat template and the context check run on
one tokenizer thread (never on the replica's event loop); ``@serve.batch`` groups concurrent arrivals
into one admission (one prefill); generation runs on the engine's thread, batching continuously.
"""

import asyncio
import concurrent.futures
import logging
import os
import uuid

from ray import serve

from llamapro.serve.engine import Prepared, engine_error, load_engine
from llamapro.serve.protocol import APIError

log = logging.getLogger("ray.serve")


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


def _set_threads(n: int):
    import torch

    torch.set_num_threads(n)


class ModelServerImpl:
    """One model: tokenization on a tokenizer thread, generation on the engine's thread; the event
    loop only moves events (so one huge prompt never stalls the other streams of the replica).

    ``@serve.batch`` groups requests arriving together into one admission (one prefill forward pass);
    the engine merges each group into its running batch at the next token. The deployment is
    ``ModelServer`` below; this class stays importable under its own name so Ray pickles it by
    reference (a by-value copy would carry only some of this module's globals)."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        _set_threads(spec["threads"])
        self.engine = load_engine(spec)
        self.packs = getattr(self.engine, "packs", None)
        if self.packs is not None:
            # Ray Serve's model multiplexing: Serve routes a pack's requests to replicas that hold
            # it, calls this on a miss, and beyond the limit evicts the least recently used pack
            # (_LoadedPack.__del__). Wired here so the limit can come from the config.
            async def load_pack(pack: str):
                return await self._load_pack(pack)

            self._get_pack = serve.multiplexed(
                max_num_models_per_replica=spec.get("max_loaded_packs") or len(self.packs.names())
            )(load_pack)
        # One thread: a fast tokenizer is not safe to call from several threads at once.
        self._tokenizer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"llamapro-tokenize-{self.name}")
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = uuid.uuid4().hex[:8]
        log.info("model %s ready: %s, %s, context %d, %d torch threads", self.name,
                 type(self.engine).__name__, self.engine.dtype, self.engine.context,
                 spec["threads"])

    def reconfigure(self, user_config: dict):
        n = int(user_config["max_batch_size"])
        self.engine.max_running = n
        self._admit.set_max_batch_size(n)
        self._admit.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def check_health(self):
        if not self.engine.alive():
            raise RuntimeError("the engine thread died")

    def info(self) -> dict:
        return {"name": self.name, "context_length": self.engine.context,
                "engine": type(self.engine).__name__, "replica": self.replica}

    def stats(self) -> dict:
        """The engine's rows: running / pending now, finished / cancelled / failed so far."""
        return {"replica": self.replica, **(self.engine.stats() if hasattr(self.engine, "stats")
                                            else {})}

    def memory(self) -> dict:
        """This replica's process memory (RSS, USS: pages only it holds) and the model's weights,
        counting shared (tied) tensors once; the packs whose blocks are loaded."""
        import psutil

        mi = psutil.Process().memory_full_info()
        model = getattr(self.engine, "model", None)
        seen, weights = set(), 0
        for t in (model.parameters() if model is not None else ()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                weights += t.numel() * t.element_size()
        return {"replica": self.replica, "pid": os.getpid(), "rss": mi.rss, "uss": mi.uss,
                "weights_bytes": weights,
                "pack_blocks_bytes": self.packs.block_bytes() if self.packs else 0,
                "loaded_packs": list(self.packs.loaded) if self.packs else []}

    async def _load_pack(self, pack: str) -> "_LoadedPack":
        await asyncio.wrap_future(self.engine.call(lambda e: e.packs.load(pack)))
        log.info("model %s: pack %s loaded (packs in memory: %s)", self.name, pack,
                 self.packs.loaded)
        return _LoadedPack(self.engine, pack)

    async def _select_pack(self, p: Prepared) -> dict | None:
        """The pack the request asked for (Serve's multiplexed model id; none = the base), loaded."""
        pack = serve.get_multiplexed_model_id()
        if not pack:
            return None
        if self.packs is None or pack not in self.packs.names():
            return {"error": APIError(404, f"The model '{pack}' is not served by {self.name}",
                                      param="model", code="model_not_found").to_dict()}
        try:
            await self._get_pack(pack)
        except Exception as e:
            log.exception("loading pack %s failed", pack)
            return {"error": engine_error(e).to_dict()}
        p.pack = pack
        return None

    async def _prepare(self, req: dict):
        loop = asyncio.get_running_loop()
        try:
            p = await loop.run_in_executor(self._tokenizer, self.engine.prepare, req)
            return p, await self._select_pack(p)
        except APIError as e:
            return None, {"error": e.to_dict()}
        except Exception as e:  # a tokenizer or chat-template bug: the request fails, not the replica
            log.exception("preparing a request failed")
            return None, {"error": engine_error(e).to_dict()}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _admit(self, reqs: list) -> list:
        """Hand a batch of concurrent requests to the engine in one go; returns at once (the
        events then flow through each request's own queue), so the next batch can form while
        this one generates."""
        self.engine.submit(reqs)
        return [None] * len(reqs)

    async def _events(self, p: Prepared):
        if self.engine.continuous:  # vLLM schedules by itself
            async for ev in self.engine.stream(p):
                yield ev
            return
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        p.emit = lambda item: loop.call_soon_threadsafe(q.put_nowait, item)
        await self._admit(p)
        while True:
            item = await q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item["finish_reason"]:
                return

    async def generate(self, req: dict) -> dict:
        p, err = await self._prepare(req)
        if err:
            return err
        p.stream = False
        parts, last = [], None
        try:
            async for ev in self._events(p):
                parts.append(ev["text"])
                last = ev
        except APIError as e:  # the engine failed this row (and keeps serving)
            return {"error": e.to_dict()}
        finally:
            p.cancelled = True  # no-op when finished; frees the row if the caller went away
        return {"text": "".join(parts), "finish_reason": last["finish_reason"],
                "prompt_tokens": len(p.ids), "completion_tokens": last["completion_tokens"],
                "replica": self.replica, "batch_size": p.batch_size}

    async def stream(self, req: dict):
        """Events: the first carries prompt_tokens/replica/batch_size; then text deltas; the last
        has finish_reason. A validation or engine failure is an {"error": ...} event (the last)."""
        p, err = await self._prepare(req)
        if err:
            yield err
            return
        first = True
        try:
            async for ev in self._events(p):
                if first:
                    ev = {**ev, "prompt_tokens": len(p.ids), "replica": self.replica,
                          "batch_size": p.batch_size}
                if first or ev["text"] or ev["finish_reason"]:
                    yield ev
                first = False
        except APIError as e:
            yield {"error": e.to_dict()}
        finally:
            p.cancelled = True


class _LoadedPack:
    """What ``@serve.multiplexed`` caches per pack; Serve calls ``__del__`` when it evicts it."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.live = engine, name, True

    def __del__(self):
        if self.live:  # once: Serve calls it on eviction, the collector again later
            self.live = False
            name = self.name
            self.engine.call(lambda e: e.packs.unload(name, e.pending_packs()))


ModelServer = serve.deployment(ModelServerImpl, name="model")
