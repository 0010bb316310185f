"""The OpenAI wire protocol of the Serve app, pure (no Ray, no model): errors, request body reading
with its limits (size, nesting), and validation of every request field into the engine's request.

Everything here raises ``APIError`` (an HTTP status and an OpenAI error body) on bad input, so the
ingress answers 4xx with what is wrong and how to fix it; nothing here can 500 on client input.
"""

import json
import math

MAX_JSON_DEPTH = 64
"""Deepest JSON nesting a request may use; real OpenAI requests nest 5 levels or so. Deeper input
is refused before it reaches the parser, whose recursion would otherwise fail (a 500)."""

class APIError(Exception):
    """An OpenAI-style error: ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after
        """Seconds for a ``Retry-After`` header (overload answers), or None."""

    def to_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "type": self.type,
                "param": self.param, "code": self.code, "retry_after": self.retry_after}

    @classmethod
    def from_dict(cls, d: dict) -> "APIError":
        return cls(d["status"], d["message"], d.get("type") or "invalid_request_error",
                   d.get("param"), d.get("code"), d.get("retry_after"))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(param: str, msg: str, code: str | None = None) -> APIError:
    return APIError(400, msg, param=param, code=code)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"'{name}' must be a number, got {v!r}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}",
                   code="invalid_value")
    return float(v)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise _bad(name, f"'{name}' must be an integer, got {v!r}")
    return v


def _unsupported(body: dict, checks: dict):
    for name, is_default in checks.items():
        if name in body and body[name] is not None and not is_default(body[name]):
            raise _bad(name, f"'{name}'={body[name]!r} is not supported by this server",
                       code="unsupported_parameter")


_COMMON_UNSUPPORTED = {
    "n": lambda v: v == 1,
    "logprobs": lambda v: v in (False, 0),
    "top_logprobs": lambda v: v in (0,),
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logit_bias": lambda v: not v,
    "best_of": lambda v: v == 1,
    "echo": lambda v: v is False,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "response_format": lambda v: isinstance(v, dict) and v.get("type", "text") == "text",
}


def parse_sampling(body: dict, limits: dict) -> dict:
    """Validate the sampling fields shared by both endpoints; returns the model request fields."""
    _unsupported(body, _COMMON_UNSUPPORTED)
    mt = _int(body, "max_completion_tokens")
    if mt is None:
        mt = _int(body, "max_tokens")
    if mt is not None:
        if mt < 1:
            raise _bad("max_tokens", f"'max_tokens' must be >= 1, got {mt}", code="invalid_value")
        if mt > limits["max_tokens"]:
            raise _bad("max_tokens", f"'max_tokens'={mt} exceeds this server's cap of "
                       f"{limits['max_tokens']}", code="max_tokens_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "'stop' must be a non-empty string or a list of up to 4 of them")
    seed = _int(body, "seed")
    for name in ("stream", "ignore_eos"):
        if name in body and body[name] is not None and not isinstance(body[name], bool):
            raise _bad(name, f"'{name}' must be true or false")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    if so and so.get("include_usage") is not None and not isinstance(so["include_usage"], bool):
        raise _bad("stream_options", "'stream_options.include_usage' must be true or false")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # OpenAI accepts it: a nucleus of mass 0 keeps only the top token (greedy)
        temperature, top_p = 0.0, 1.0
    return {"max_tokens": mt, "default_max_tokens": limits["default_max_tokens"],
            "temperature": temperature, "top_p": top_p,
            "stop": stop, "seed": seed, "ignore_eos": bool(body.get("ignore_eos") or False)}


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "'messages' is required", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise _bad(f"messages[{i}]", f"messages[{i}] needs a 'role' in {sorted(_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise _bad(f"messages[{i}].content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "'content' must be a string or text parts")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict, max_prompts: int) -> list:
    """/v1/completions ``prompt``: a string, a list of strings, token ids, or lists of token ids."""
    p = body.get("prompt")
    if p is None:
        raise _bad("prompt", "'prompt' is required", code="missing_required_parameter")
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(
            isinstance(x, str) or (isinstance(x, list) and x and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)) for x in p):
        prompts = list(p)
    else:
        raise _bad("prompt", "'prompt' must be a string, a list of strings, or token id list(s)")
    if len(prompts) > max_prompts:
        raise _bad("prompt", f"at most {max_prompts} prompts per request, got {len(prompts)}")
    return prompts


def _depth_ok(raw: bytes, limit: int) -> bool:
    """True when no array/object nests deeper than ``limit`` (brackets inside strings skipped).
    A linear byte scan: cheap next to json.loads, and it never recurses."""
    depth, in_str, esc = 0, False, False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The request body as a JSON object, or APIError 400 naming what is wrong."""
    if not _depth_ok(raw, max_depth):
        raise APIError(400, f"The request body nests JSON deeper than {max_depth} levels.",
                       code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds this server's limit of {limit} bytes "
                    "(serve.limits.max_body_bytes).", code="request_too_large")


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
