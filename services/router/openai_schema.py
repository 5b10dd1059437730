"""OpenAI request bodies -> domain requests, and domain events -> OpenAI response objects.

Accepted beyond the OpenAI schema (as vLLM-style servers do, so benchmark clients work):
top_k, min_p, repetition_penalty, ignore_eos; and Switchyard's own `prompt_version`,
`cache` ({mode, allow_sampled, allow_semantic, min_similarity}) and `labels`. Fields the router
cannot honour (n > 1, tools, echo, ...) are rejected with 400 naming the parameter; unknown
fields are ignored, as clients send newer ones.

Known fields are type-checked strictly (JSON booleans for flags, numbers for numbers, strings
for text): a body is untrusted input, and whatever passes here must convert to protobuf
without raising. So integers must fit their proto fields, floats a 32-bit float, and strings
must be encodable as UTF-8 (JSON's \\ud800 escapes can carry lone surrogates). Error messages
quote the offending value shortened (`_show`), never a multi-megabyte or deeply nested echo.
"""

from __future__ import annotations

import math
import reprlib
import time
from dataclasses import asdict
from typing import Any

from services.router.domain import (
    CacheMode,
    CachePolicy,
    Chunk,
    Final,
    FinishReason,
    GenerateRequest,
    Message,
    RouteInfo,
    Sampling,
    Tier,
    TokenLogprob,
)
from services.router.errors import InvalidArgument, ModelNotFound

AUTO_MODEL = "auto"
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
UINT32_MAX = 2**32 - 1
"""max_tokens and top_k travel as uint32 to the worker."""
MAX_SEED = 2**63 - 1
"""The worker's seed limit (torch generators take signed 64-bit seeds)."""
_FLOAT32_MAX = 3.4028234663852886e38
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.ABORT: "stop", FinishReason.ERROR: "stop"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}
_UNSUPPORTED = {"tools": None, "tool_choice": ("none", "auto"), "functions": None,
                "function_call": ("none", "auto"), "logit_bias": None, "suffix": None,
                "audio": None, "prediction": None, "best_of": (1,), "echo": (False,),
                "parallel_tool_calls": None}
_CACHE_MODES = {m.name.lower(): m for m in CacheMode if m != CacheMode.UNSPECIFIED}
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 60
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 3, 4, 4
"""Bounded repr: depth, length and item counts capped (reprlib never recurses past maxlevel)."""


def _show(value: Any) -> str:
    return _SHOW.repr(value)


# --- typed field readers (None: the field is absent or null) -----------------------------------

def _text(value: str, path: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(path, f"is not valid Unicode (lone surrogate at index "
                              f"{exc.start})") from None
    return value


def _string(d: dict, key: str, path: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(path, f"must be a string, got {_show(value)}")
    return _text(value, path)


def _flag(d: dict, key: str, path: str) -> bool | None:
    value = d.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise InvalidArgument(path, f"must be true or false, got {_show(value)}")


def _float(d: dict, key: str, path: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(path, f"must be a number, got {_show(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer literal past the float range
        raise InvalidArgument(path, "is out of range") from None
    if not math.isfinite(value):
        raise InvalidArgument(path, f"must be finite, got {value!r}")
    if abs(value) > _FLOAT32_MAX:
        raise InvalidArgument(path, f"is out of range, got {value!r}")
    return value


def _int(d: dict, key: str, path: str, lo: int, hi: int) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # 16.0 is an integer in JSON
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(path, f"must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise InvalidArgument(path, f"must be in [{lo}, {hi}], got {_show(value)}")
    return value


# --- requests --------------------------------------------------------------------------------

def model_tier(model: Any) -> Tier | None:
    """"auto" -> None (the classifier decides); a tier name -> that tier."""
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model", "is required (a tier name or \"auto\")")
    if model == AUTO_MODEL:
        return None
    try:
        return Tier.parse(model)
    except ValueError:
        raise ModelNotFound("model", f"the model {_show(model)} does not exist; use \"auto\" "
                            f"or one of {[t.label for t in Tier]}") from None


def _check_unsupported(body: dict) -> None:
    for name, allowed in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or value == [] or value == {}:
            continue
        if allowed is None or value not in allowed:
            raise InvalidArgument(name, f"is not supported by this server (got {_show(value)})")
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidArgument("n", f"only n=1 is supported, got {_show(n)}")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise InvalidArgument("response_format", "only {\"type\": \"text\"} is supported")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgument("stop", "must be a non-empty string or a list of them")
    return tuple(_text(s, "stop") for s in stop)


def _labels(body: dict) -> tuple[tuple[str, str], ...]:
    labels = body.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidArgument("labels", "must map strings to strings")
    return tuple(sorted((_text(k, "labels"), _text(v, "labels")) for k, v in labels.items()))


def _cache_policy(body: dict) -> CachePolicy | None:
    c = body.get("cache")
    if c is None:
        return None
    if not isinstance(c, dict):
        raise InvalidArgument("cache", "must be an object")
    mode = c.get("mode", "unspecified")
    if not isinstance(mode, str) or (mode != "unspecified" and mode not in _CACHE_MODES):
        raise InvalidArgument("cache.mode", f"must be one of {sorted(_CACHE_MODES)}, "
                              f"got {_show(mode)}")
    return CachePolicy(mode=_CACHE_MODES.get(mode, CacheMode.UNSPECIFIED),
                       allow_sampled=bool(_flag(c, "allow_sampled", "cache.allow_sampled")),
                       allow_semantic=_flag(c, "allow_semantic", "cache.allow_semantic"),
                       min_similarity=_float(c, "min_similarity", "cache.min_similarity"))


def stream_include_usage(body: dict) -> bool:
    """stream_options.include_usage of a body (False when absent)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidArgument("stream_options", f"must be an object, got {_show(options)}")
    return bool(_flag(options, "include_usage", "stream_options.include_usage"))


def _common(body: dict, logprobs: int | None, max_tokens_default: int) -> dict:
    _check_unsupported(body)
    max_tokens = _int(body, "max_completion_tokens", "max_completion_tokens", 1, UINT32_MAX)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", "max_tokens", 1, UINT32_MAX)
    sampling = Sampling(
        **{name: _float(body, name, name) for name in (
            "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty")},
        top_k=_int(body, "top_k", "top_k", 1, UINT32_MAX),
        seed=_int(body, "seed", "seed", 0, MAX_SEED), stop=_stop(body), logprobs=logprobs,
        ignore_eos=bool(_flag(body, "ignore_eos", "ignore_eos")))
    return {"max_tokens": max_tokens_default if max_tokens is None else max_tokens,
            "sampling": sampling, "tier_hint": model_tier(body.get("model")),
            "cache": _cache_policy(body),
            "prompt_version": _string(body, "prompt_version", "prompt_version") or "",
            "labels": _labels(body), "stream": bool(_flag(body, "stream", "stream")),
            "api": "openai"}


def _content(value: Any, path: str) -> str:
    if isinstance(value, str):
        return _text(value, path)
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text", ""), str):
                raise InvalidArgument(f"{path}[{i}]", "only text content parts (a string "
                                      "\"text\") are supported")
            parts.append(_text(part.get("text", ""), f"{path}[{i}]"))
        return "".join(parts)
    raise InvalidArgument(path, "must be a string or a list of text parts")


def _message(m: Any, i: int) -> Message:
    role = m.get("role") if isinstance(m, dict) else None
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidArgument(f"messages[{i}].role", f"must be one of {sorted(_ROLES)}")
    if m.get("tool_calls"):
        raise InvalidArgument(f"messages[{i}].tool_calls", "tool calls are not supported")
    return Message(_ROLES[role], _content(m.get("content"), f"messages[{i}].content"),
                   _string(m, "name", f"messages[{i}].name") or "")


def parse_chat(body: dict, **identity: Any) -> GenerateRequest:
    """A /v1/chat/completions body -> GenerateRequest (identity: request_id, tenant,
    permission_scope, deadline)."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("messages", "must be a non-empty list")
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    logprobs = None
    if _flag(body, "logprobs", "logprobs"):
        logprobs = _int(body, "top_logprobs", "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    return GenerateRequest(messages=messages,
                           **_common(body, logprobs, DEFAULT_CHAT_MAX_TOKENS), **identity)


def parse_completion(body: dict, **identity: Any) -> GenerateRequest:
    """A /v1/completions body -> GenerateRequest."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt", "must be a string (or a list of exactly one string)")
    logprobs = _int(body, "logprobs", "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return GenerateRequest(prompt=_text(prompt, "prompt"),
                           **_common(body, logprobs, DEFAULT_COMPLETION_MAX_TOKENS), **identity)


# --- responses -------------------------------------------------------------------------------

def route_json(route: RouteInfo) -> dict:
    d = asdict(route)
    d["tier"] = route.tier.label if route.tier else None
    d["classified_tier"] = route.classified_tier.label if route.classified_tier else None
    d["attempted_tiers"] = [t.label for t in route.attempted_tiers]
    d["cache_result"] = route.cache_result.name.lower()
    return d


def usage_json(f: Final) -> dict:
    u = f.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def _token_text(lp: TokenLogprob, chunk: Chunk) -> str:
    if len(chunk.token_ids) == 1:
        return chunk.text
    return next((t.text for t in lp.top if t.token_id == lp.token_id), "")


def chat_logprobs(chunks: list[Chunk]) -> dict | None:
    entries = []
    for c in chunks:
        for lp in c.logprobs:
            text = _token_text(lp, c)
            entries.append({"token": text, "logprob": lp.logprob,
                            "bytes": list(text.encode()),
                            "top_logprobs": [{"token": t.text, "logprob": t.logprob,
                                              "bytes": list(t.text.encode())} for t in lp.top]})
    return {"content": entries} if entries else None


def completion_logprobs(chunks: list[Chunk]) -> dict | None:
    tokens, lps, tops = [], [], []
    for c in chunks:
        for lp in c.logprobs:
            tokens.append(_token_text(lp, c))
            lps.append(lp.logprob)
            tops.append({t.text: t.logprob for t in lp.top})
    if not tokens:
        return None
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}


def model_name(f: Final, requested: Tier | None) -> str:
    if f.route.tier is not None:
        return f.route.tier.label
    return requested.label if requested else AUTO_MODEL


def chat_completion(rid: str, req: GenerateRequest, chunks: list[Chunk], f: Final) -> dict:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name(f, req.tier_hint), "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": _FINISH[f.finish_reason],
                         "message": {"role": "assistant",
                                     "content": "".join(c.text for c in chunks)},
                         "logprobs": chat_logprobs(chunks) if req.sampling.logprobs is not None
                         else None}],
            "usage": usage_json(f), "switchyard": route_json(f.route)}


def text_completion(rid: str, req: GenerateRequest, chunks: list[Chunk], f: Final) -> dict:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
            "model": model_name(f, req.tier_hint), "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": _FINISH[f.finish_reason],
                         "text": "".join(c.text for c in chunks),
                         "logprobs": completion_logprobs(chunks)
                         if req.sampling.logprobs is not None else None}],
            "usage": usage_json(f), "switchyard": route_json(f.route)}


class StreamShaper:
    """Builds the SSE objects of one streamed response (chat or text completion)."""

    def __init__(self, chat: bool, rid: str, req: GenerateRequest):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self.model = req.tier_hint.label if req.tier_hint else AUTO_MODEL
        self.req = req
        self.first = True

    def _wrap(self, choice: dict, **extra: Any) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": [choice], **extra}

    def chunk(self, c: Chunk) -> dict:
        want_lp = self.req.sampling.logprobs is not None
        if self.chat:
            delta: dict = {"content": c.text}
            if self.first:
                delta["role"] = "assistant"
            self.first = False
            return self._wrap({"index": 0, "delta": delta, "finish_reason": None,
                               "logprobs": chat_logprobs([c]) if want_lp else None})
        return self._wrap({"index": 0, "text": c.text, "finish_reason": None,
                           "logprobs": completion_logprobs([c]) if want_lp else None})

    def final(self, f: Final) -> dict:
        self.model = model_name(f, self.req.tier_hint)
        body = {"index": 0, "finish_reason": _FINISH[f.finish_reason], "logprobs": None}
        body.update({"delta": {}} if self.chat else {"text": ""})
        return self._wrap(body, switchyard=route_json(f.route))

    def usage(self, f: Final) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": [],
                "usage": usage_json(f)}
