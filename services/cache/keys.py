"""Cache keys: a canonical form of everything that decides an answer, hashed.

Exact key. The canonical form is a JSON document (sorted keys, no whitespace) of:
- the whole scope (tenant, permission scope, model id and version, prompt version);
- the input: raw prompt, or every chat message (role, name, content) plus add_generation_prompt;
  text is kept byte for byte, since whitespace or case changes can change the model's output;
- the output-affecting sampling parameters, normalized so equal behaviour gives equal keys:
  greedy requests (temperature 0, or top_k 1) drop temperature/top_p/top_k/min_p/seed, which
  greedy decoding ignores; "off" values equal unset (top_p 1, min_p 0, repetition_penalty 1,
  presence/frequency penalty 0); stop strings and stop token ids are sets;
- for LENGTH-truncated answers only, max_tokens (such an answer only fits an equal budget).
  STOP answers are keyed without it and serve any max_tokens >= their completion tokens.
The entry id is the first 128 bits of SHA-256 of that form, in hex.

Semantic group. Semantic search only compares entries whose canonical form is equal except for
the text of the last user turn (so the same scope, system prompt, earlier turns and sampling).
The group key hashes the canonical form with that text blanked.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from services.cache.domain import InvalidArgument, Query, Role, Sampling

_VERSION = 1


@dataclass(frozen=True)
class QueryKeys:
    """The keys of one query."""

    stop_id: str
    """Entry id of a STOP answer to this query."""
    length_id: str
    """Entry id of a LENGTH answer to this query at its max_tokens."""
    group: str | None
    """Semantic group key; None when the query has no trailing user turn."""
    semantic_text: str | None
    """Text that is embedded: the last user turn (or the raw prompt)."""


def validate(query: Query) -> None:
    """Raises InvalidArgument for a query the cache cannot key."""
    if (query.prompt is None) == (query.messages is None):
        raise InvalidArgument("query.input", "exactly one of prompt or chat is required")
    if query.messages is not None:
        if not query.messages:
            raise InvalidArgument("query.chat.messages", "at least one message is required")
        for i, m in enumerate(query.messages):
            if m.role == Role.UNSPECIFIED:
                raise InvalidArgument(f"query.chat.messages[{i}].role", "role is required")
    if query.max_tokens < 1:
        raise InvalidArgument("query.max_tokens", f"must be >= 1, got {query.max_tokens}")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = getattr(query.sampling, name)
        if value is not None and not math.isfinite(value):
            raise InvalidArgument(f"query.sampling.{name}", f"must be finite, got {value}")


def effective_temperature(sampling: Sampling, default_temperature: float) -> float:
    """The temperature the worker will use."""
    return default_temperature if sampling.temperature is None else sampling.temperature


def is_sampled(sampling: Sampling, default_temperature: float) -> bool:
    """True unless decoding is greedy (temperature 0, or top_k 1)."""
    greedy = effective_temperature(sampling, default_temperature) == 0 or sampling.top_k == 1
    return not greedy


def _off(value: float | None, off: float) -> float | None:
    return None if value is None or value == off else value


def canonical_sampling(s: Sampling, default_temperature: float) -> dict:
    """The output-affecting sampling parameters, normalized (see module docstring)."""
    out: dict = {
        "stop": sorted(set(s.stop)),
        "stop_token_ids": sorted(set(s.stop_token_ids)),
        "ignore_eos": s.ignore_eos,
        "repetition_penalty": _off(s.repetition_penalty, 1.0),
        "presence_penalty": _off(s.presence_penalty, 0.0),
        "frequency_penalty": _off(s.frequency_penalty, 0.0),
    }
    if not is_sampled(s, default_temperature):
        out["greedy"] = True
        return out
    out.update(
        temperature=effective_temperature(s, default_temperature),
        top_p=_off(s.top_p, 1.0),
        top_k=s.top_k,
        min_p=_off(s.min_p, 0.0),
        seed=s.seed,
    )
    return out


def _input(query: Query, blank_last_user: bool) -> dict:
    if query.prompt is not None:
        return {"prompt": None if blank_last_user else query.prompt}
    msgs = [[m.role.name, m.name, m.content] for m in query.messages or ()]
    if blank_last_user:
        msgs[-1][2] = None
    agp = True if query.add_generation_prompt is None else query.add_generation_prompt
    return {"chat": msgs, "add_generation_prompt": agp}


def _digest(doc: dict) -> str:
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def canonical(query: Query, default_temperature: float, *, blank_last_user: bool = False,
              length_max_tokens: int | None = None) -> dict:
    """The canonical form of `query` as a JSON-able dict (see module docstring)."""
    s = query.scope
    return {
        "v": _VERSION,
        "scope": [s.tenant, s.permission_scope, s.model_id, s.model_version, s.prompt_version],
        "input": _input(query, blank_last_user),
        "sampling": canonical_sampling(query.sampling, default_temperature),
        "length_max_tokens": length_max_tokens,
    }


def semantic_text(query: Query) -> str | None:
    """The raw prompt, or the last message if it is a user turn; else None."""
    if query.prompt is not None:
        return query.prompt
    last = (query.messages or ())[-1]
    return last.content if last.role == Role.USER else None


def query_keys(query: Query, default_temperature: float) -> QueryKeys:
    """Entry ids (STOP and LENGTH variants) and semantic group of a validated query."""
    stop_id = _digest(canonical(query, default_temperature))
    length_id = _digest(canonical(query, default_temperature, length_max_tokens=query.max_tokens))
    text = semantic_text(query)
    group = None
    if text is not None:
        group = _digest({"semantic": canonical(query, default_temperature, blank_last_user=True)})
    return QueryKeys(stop_id, length_id, group, text)
