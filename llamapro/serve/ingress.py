"""The ingress deployment: FastAPI routes of the OpenAI API (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` with SSE when ``stream``, ``/health``), the Bearer key check, request
validation, bounded bodies and timeouts, and the canary routing to the model deployments.

Weights and limits are its ``user_config``: redeploying a config that only changes them calls
``reconfigure`` on the live replica (no restart, no dropped request).
"""

import asyncio
import dataclasses
import hmac
import logging
import math
import random
import threading
import time
import uuid
from typing import Any

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class in the
# ingress methods' signatures (under Serve a string annotation turns it into a query parameter).
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from llamapro.config.serve import LimitsConfig
from llamapro.serve.auth import api_key_digest, key_digest
from llamapro.serve.protocol import (
    APIError,
    _bad,
    parse_json_body,
    parse_messages,
    parse_prompts,
    parse_sampling,
    sse,
    too_large,
    usage,
)

log = logging.getLogger("ray.serve")

INGRESS_NAME = "ingress"

api = FastAPI(title="llamapro", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(max(0, math.ceil(e.retry_after)))
    return JSONResponse(e.body(), status_code=e.status, headers=headers or None)


def _cancel(response) -> None:
    """Cancel a model call, best effort: Serve's ``cancel`` re-raises how the call itself ended
    (a full queue, a finished request), which is no error here."""
    try:
        response.cancel()
    except Exception:
        pass


class OpenAIIngressImpl:
    """HTTP, auth, validation and canary routing; owns no model. Deployed as ``OpenAIIngress``."""

    def __init__(self, spec: dict, models: dict):
        self.alias = spec["alias"]
        # {name clients send: DeploymentHandle}; a pack's requests go to its base model's replicas,
        # tagged with the pack as Serve's multiplexed model id
        routes = spec.get("routes") or {n: [n, ""] for n in models}
        self.models = {n: (models[m].options(multiplexed_model_id=p) if p else models[m])
                       for n, (m, p) in routes.items()}
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:
            app_name = ""
        self._key_digest = api_key_digest(spec, app_name)  # the key itself is not kept
        self.weights = {name: (1.0 if i == 0 else 0.0) for i, name in enumerate(self.models)}
        self.limits = dataclasses.asdict(LimitsConfig())
        self.retry_after = {name: 2.0 for name in self.models}
        self._seed: Any = object()
        self.rng = random.Random()
        self.created = int(time.time())
        self._lock = threading.Lock()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = uuid.uuid4().hex[:8]

    def reconfigure(self, user_config: dict):
        weights = {k: float(v) for k, v in user_config["weights"].items() if k in self.models}
        if sum(weights.values()) <= 0:
            raise ValueError("canary weights must have a positive sum")
        with self._lock:
            self.weights = weights
            self.limits = {**self.limits, **(user_config.get("limits") or {})}
            self.retry_after.update(user_config.get("retry_after_s") or {})
            seed = user_config.get("seed")
            if seed != self._seed:  # a new seed restarts the sequence; new weights alone do not
                self._seed = seed
                self.rng = random.Random(seed) if seed is not None else random.Random()
        log.info("canary weights now %s", weights)

    # helpers
    def _auth(self, request: Request):
        if self._key_digest is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()),
                                                                    self._key_digest):
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def _route(self, requested) -> str:
        if requested is not None and not isinstance(requested, str):
            raise _bad("model", "'model' must be a string")
        if requested in (None, "", self.alias):
            with self._lock:
                names = [n for n, w in self.weights.items() if w > 0]
                return self.rng.choices(names, [self.weights[n] for n in names])[0]
        if requested in self.models:
            return requested
        raise APIError(404, f"The model '{requested}' does not exist. Available: "
                       f"{', '.join([self.alias, *self.models])}", param="model",
                       code="model_not_found")

    async def _body(self, request: Request) -> dict:
        """The JSON body, read in chunks up to ``limits.max_body_bytes`` (413 beyond, even when the
        client sends no Content-Length)."""
        self._auth(request)
        limit = int(self.limits["max_body_bytes"])
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_large(limit)
        return parse_json_body(bytes(raw))

    def _overloaded(self, name: str, e) -> APIError:
        retry = getattr(e, "retry_after_s", None)
        return APIError(503, f"Model '{name}' is at capacity (its queue is full); retry after the "
                        "Retry-After delay.", type="server_error", code="overloaded",
                        retry_after=retry if retry is not None else self.retry_after.get(name, 2.0))

    def _timed_out(self) -> APIError:
        return APIError(504, f"The model did not answer within {self.limits['request_timeout_s']:g}s "
                        "(serve.limits.request_timeout_s); the request was cancelled.",
                        type="server_error", code="timeout")

    async def _call(self, name: str, reqs: list[dict]) -> list[dict]:
        """Generate every request on model ``name`` concurrently. The first failure (an invalid
        prompt, a full queue, a timeout) cancels the others at once: their rows leave the batch
        instead of generating text nobody will receive."""
        from ray.serve.exceptions import BackPressureError

        responses = [self.models[name].generate.remote(r) for r in reqs]

        async def one(resp):
            res = await resp
            if "error" in res:
                raise APIError.from_dict(res["error"])
            return res

        try:
            async with asyncio.timeout(float(self.limits["request_timeout_s"])):
                return list(await asyncio.gather(*[one(r) for r in responses]))
        except BaseException as e:
            for r in responses:
                _cancel(r)
            if isinstance(e, BackPressureError):
                raise self._overloaded(name, e) from None
            if isinstance(e, TimeoutError):
                raise self._timed_out() from None
            raise

    async def _guard(self, coro):
        from ray.exceptions import RayActorError

        try:
            return await coro
        except APIError as e:
            return _error_response(e)
        except RayActorError:
            log.exception("a model replica died during a request")
            return _error_response(APIError(503, "a model replica became unavailable; retry",
                                            type="server_error", code="unavailable"))
        except Exception:
            log.exception("unexpected error")
            return _error_response(APIError(500, "internal server error", type="server_error"))

    def _headers(self, name: str, res: dict) -> dict:
        """Which model, model replica and ingress replica served, and the batch it was part of."""
        return {"x-llamapro-model": name, "x-llamapro-replica": str(res.get("replica", "")),
                "x-llamapro-ingress": self.replica,
                "x-llamapro-batch-size": str(res.get("batch_size", ""))}

    # routes
    @api.get("/health")
    async def health(self):
        return {"status": "ok", "models": list(self.models), "alias": self.alias}

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        async def run():
            self._auth(request)
            data = [{"id": n, "object": "model", "created": self.created, "owned_by": "llamapro"}
                    for n in self.models]
            data.append({"id": self.alias, "object": "model", "created": self.created,
                         "owned_by": "llamapro", "routing": dict(self.weights)})
            return {"object": "list", "data": data}

        return await self._guard(run())

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def run():
            body = await self._body(request)
            messages = parse_messages(body)
            req = {"kind": "chat", "messages": messages, **parse_sampling(body, self.limits)}
            name = self._route(body.get("model"))
            if body.get("stream"):
                return await self._stream(name, req, body, chat=True)
            (res,) = await self._call(name, [req])
            return JSONResponse({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                             "finish_reason": res["finish_reason"], "logprobs": None}],
                "usage": usage(res["prompt_tokens"], res["completion_tokens"]),
            }, headers=self._headers(name, res))

        return await self._guard(run())

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        async def run():
            body = await self._body(request)
            prompts = parse_prompts(body, self.limits["max_prompts"])
            sampling = parse_sampling(body, self.limits)
            name = self._route(body.get("model"))
            if body.get("stream"):
                if len(prompts) != 1:
                    raise _bad("prompt", "streaming takes a single prompt")
                return await self._stream(name, {"kind": "completion", "prompt": prompts[0],
                                                 **sampling}, body, chat=False)
            results = await self._call(
                name, [{"kind": "completion", "prompt": p, **sampling} for p in prompts])
            return JSONResponse({
                "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                             "logprobs": None} for i, r in enumerate(results)],
                "usage": usage(sum(r["prompt_tokens"] for r in results),
                                sum(r["completion_tokens"] for r in results)),
            }, headers=self._headers(name, results[0]))

        return await self._guard(run())

    async def _stream(self, name: str, req: dict, body: dict, chat: bool):
        from ray.serve.exceptions import BackPressureError

        gen = self.models[name].options(stream=True).stream.remote(req)
        timeout = float(self.limits["request_timeout_s"])

        async def nxt():  # the next event, None at the end; waits at most request_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    return await gen.__anext__()
            except StopAsyncIteration:
                return None

        try:
            first = await nxt()
        except BaseException as e:
            _cancel(gen)
            if isinstance(e, BackPressureError):
                raise self._overloaded(name, e) from None
            if isinstance(e, TimeoutError):
                raise self._timed_out() from None
            raise
        if first is None:
            raise APIError(500, "the model produced no output", type="server_error")
        if "error" in first:
            raise APIError.from_dict(first["error"])
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, finish):
            if chat:
                delta = {"content": text} if text else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return sse({"id": rid, "object": obj, "created": created, "model": name,
                         "choices": [choice]})

        async def events():
            ev, last, failed = first, first, False
            try:
                if chat:
                    yield sse({"id": rid, "object": obj, "created": created, "model": name,
                                "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                   "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
                while ev is not None:
                    if "error" in ev:  # the engine failed this row mid-stream
                        yield sse({"error": {k: v for k, v in ev["error"].items()
                                              if k in ("message", "type", "param", "code")}})
                        ev, failed = None, True
                        break
                    last = ev
                    if ev["text"] or ev["finish_reason"]:
                        yield chunk(ev["text"], ev["finish_reason"])
                    ev = await nxt()
                if include_usage and not failed:
                    yield sse({"id": rid, "object": obj, "created": created, "model": name,
                                "choices": [], "usage": usage(first["prompt_tokens"],
                                                               last["completion_tokens"])})
            except TimeoutError:
                yield sse(self._timed_out().body())
            except Exception:
                log.exception("stream from model %s failed", name)
                yield sse(APIError(500, "the stream failed", type="server_error").body())
            finally:
                if ev is not None:  # the client went away (or we failed): stop generating
                    _cancel(gen)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**self._headers(name, first), "Cache-Control": "no-cache"})


OpenAIIngress = serve.deployment(serve.ingress(api)(OpenAIIngressImpl), name=INGRESS_NAME)
