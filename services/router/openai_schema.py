"""OpenAI request bodies -> domain requests, and domain events -> OpenAI response objects.

Accepted beyond the OpenAI schema (as vLLM-style servers do, so benchmark clients work):
top_k, min_p, repetition_penalty, ignore_eos; and Switchyard's own `prompt_version`,
`cache` ({mode, allow_sampled, allow_semantic, min_similarity}) and `labels`. Fields the router
cannot honour (n > 1, tools, echo, ...) are rejected with 400 naming the parameter; unknown
fields are ignored, as clients send newer ones.
"""

from __future__ import annotations

import math
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
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.ABORT: "stop", FinishReason.ERROR: "stop"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}
_UNSUPPORTED = {"tools": None, "tool_choice": ("none", "auto"), "functions": None,
                "function_call": ("none", "auto"), "logit_bias": None, "suffix": None,
                "audio": None, "prediction": None, "best_of": (1,), "echo": (False,),
                "parallel_tool_calls": None}
_CACHE_MODES = {m.name.lower(): m for m in CacheMode if m != CacheMode.UNSPECIFIED}


def model_tier(model: Any) -> Tier | None:
    """"auto" -> None (the classifier decides); a tier name -> that tier."""
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model", "is required (a tier name or \"auto\")")
    if model == AUTO_MODEL:
        return None
    try:
        return Tier.parse(model)
    except ValueError:
        raise ModelNotFound("model", f"the model {model!r} does not exist; use \"auto\" or one "
                            f"of {[t.label for t in Tier]}") from None


def _number(body: dict, name: str, kind: type = float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise InvalidArgument(name, f"must be a{'n integer' if kind is int else ' number'}, "
                              f"got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgument(name, f"must be finite, got {value!r}")
    return kind(value)


def _check_unsupported(body: dict) -> None:
    for name, allowed in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or value == [] or value == {}:
            continue
        if allowed is None or value not in allowed:
            raise InvalidArgument(name, f"is not supported by this server (got {value!r})")
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidArgument("n", f"only n=1 is supported, got {n!r}")
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
    return tuple(stop)


def _cache_policy(body: dict) -> CachePolicy | None:
    c = body.get("cache")
    if c is None:
        return None
    if not isinstance(c, dict):
        raise InvalidArgument("cache", "must be an object")
    mode = c.get("mode", "unspecified")
    if mode != "unspecified" and mode not in _CACHE_MODES:
        raise InvalidArgument("cache.mode", f"must be one of {sorted(_CACHE_MODES)}, "
                              f"got {mode!r}")
    sim = c.get("min_similarity")
    return CachePolicy(mode=_CACHE_MODES.get(mode, CacheMode.UNSPECIFIED),
                       allow_sampled=bool(c.get("allow_sampled", False)),
                       allow_semantic=c.get("allow_semantic"),
                       min_similarity=None if sim is None else float(sim))


def _common(body: dict, logprobs: int | None, max_tokens_default: int) -> dict:
    _check_unsupported(body)
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    labels = body.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidArgument("labels", "must map strings to strings")
    sampling = Sampling(
        temperature=_number(body, "temperature"), top_p=_number(body, "top_p"),
        top_k=_number(body, "top_k", int), min_p=_number(body, "min_p"),
        repetition_penalty=_number(body, "repetition_penalty"),
        presence_penalty=_number(body, "presence_penalty"),
        frequency_penalty=_number(body, "frequency_penalty"), seed=_number(body, "seed", int),
        stop=_stop(body), logprobs=logprobs, ignore_eos=bool(body.get("ignore_eos", False)))
    if sampling.seed is not None and sampling.seed < 0:
        raise InvalidArgument("seed", f"must be >= 0, got {sampling.seed}")
    return {"max_tokens": max_tokens_default if max_tokens is None else max_tokens,
            "sampling": sampling, "tier_hint": model_tier(body.get("model")),
            "cache": _cache_policy(body), "prompt_version": str(body.get("prompt_version", "")),
            "labels": tuple(sorted(labels.items())), "stream": bool(body.get("stream", False)),
            "api": "openai"}


def _content(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidArgument(f"{path}[{i}]", "only text content parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise InvalidArgument(path, "must be a string or a list of text parts")


def parse_chat(body: dict, **identity: Any) -> GenerateRequest:
    """A /v1/chat/completions body -> GenerateRequest (identity: request_id, tenant,
    permission_scope, deadline)."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("messages", "must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {sorted(_ROLES)}")
        if m.get("tool_calls"):
            raise InvalidArgument(f"messages[{i}].tool_calls", "tool calls are not supported")
        messages.append(Message(_ROLES[m["role"]], _content(m.get("content"),
                                f"messages[{i}].content"), str(m.get("name") or "")))
    logprobs = None
    if body.get("logprobs"):
        top = _number(body, "top_logprobs", int) or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        logprobs = top
    return GenerateRequest(messages=tuple(messages),
                           **_common(body, logprobs, DEFAULT_CHAT_MAX_TOKENS), **identity)


def parse_completion(body: dict, **identity: Any) -> GenerateRequest:
    """A /v1/completions body -> GenerateRequest."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt", "must be a string (or a list of exactly one string)")
    logprobs = _number(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise InvalidArgument("logprobs", f"must be in [0, 5], got {logprobs}")
    return GenerateRequest(prompt=prompt,
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
