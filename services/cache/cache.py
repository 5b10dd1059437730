"""The response cache: exact and semantic lookup, store, invalidation and stats.

Lookup order: policy (bypass?) -> exact (one Redis round trip for the STOP and LENGTH keys) ->
semantic (embed the last user turn, search the in-process index within the query's group,
fetch the best few candidates, serve the first that fits max_tokens and passes the guard).
Redis failures never escape Lookup or Store: they answer UNAVAILABLE / not stored (fail-open).
"""

from __future__ import annotations

import json
import logging
import time

from services.cache.config import CacheConfig
from services.cache.domain import (
    Answer,
    CacheStats,
    FinishReason,
    InvalidArgument,
    InvalidateKind,
    InvalidateTarget,
    LookupOutcome,
    Policy,
    Query,
    ResultKind,
    StoreOutcome,
    StoreUnavailable,
    Usage,
)
from services.cache.embedder import Embedder
from services.cache.guard import SemanticGuard, TextFeatures
from services.cache.index import VectorIndex
from services.cache.keys import QueryKeys, query_keys, validate
from services.cache.metrics import CacheMetrics
from services.cache.policy import Decision, decide
from services.cache.store import Fetched, Record, RedisStore

logger = logging.getLogger(__name__)

_STORABLE = (FinishReason.STOP, FinishReason.LENGTH)


def encode_answer(answer: Answer, max_tokens: int, created_unix_ms: float) -> bytes:
    """The JSON stored in Redis for an answer (max_tokens: the request's, for LENGTH checks)."""
    u = answer.usage
    return json.dumps({
        "text": answer.text, "token_ids": list(answer.token_ids),
        "usage": [u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens],
        "tier": answer.tier, "model_id": answer.model_id,
        "finish_reason": int(answer.finish_reason), "stop_reason": answer.stop_reason,
        "created_unix_ms": created_unix_ms, "max_tokens": max_tokens,
    }, separators=(",", ":")).encode()


def decode_answer(meta: bytes) -> tuple[Answer, int]:
    """Inverse of encode_answer: (answer, max_tokens of the request that produced it)."""
    d = json.loads(meta)
    answer = Answer(
        text=d["text"], token_ids=tuple(d["token_ids"]), usage=Usage(*d["usage"]),
        tier=d["tier"], model_id=d["model_id"], finish_reason=FinishReason(d["finish_reason"]),
        created_unix_ms=d["created_unix_ms"], stop_reason=d["stop_reason"])
    return answer, d["max_tokens"]


def fits(answer: Answer, stored_max_tokens: int, max_tokens: int) -> bool:
    """A STOP answer serves any budget that covers it; a LENGTH one only an equal budget."""
    if answer.finish_reason == FinishReason.STOP:
        return answer.usage.completion_tokens <= max_tokens
    return stored_max_tokens == max_tokens


class ResponseCache:
    """Exact + semantic response cache over a RedisStore and an in-process VectorIndex."""

    def __init__(self, config: CacheConfig, store: RedisStore, index: VectorIndex,
                 embedder: Embedder, guard: SemanticGuard, metrics: CacheMetrics):
        self.config = config
        self.store = store
        self.index = index
        self.embedder = embedder
        self.guard = guard
        self.metrics = metrics

    # Lookup ---------------------------------------------------------------------------------

    def lookup(self, query: Query, policy: Policy) -> LookupOutcome:
        """Finds a cached answer. Raises InvalidArgument for a malformed query or policy."""
        t0 = time.perf_counter()
        validate(query)
        decision = decide(query, policy, self.config)
        stage = "none"
        if not decision.lookup:
            out = LookupOutcome(ResultKind.BYPASSED, reason=decision.lookup_reason)
        else:
            keys = query_keys(query, self.config.default_temperature)
            try:
                stage = "exact"
                out = self._exact(query, keys)
                if out is None and not decision.semantic:
                    out = LookupOutcome(ResultKind.MISS, reason="no exact match; semantic off")
                elif out is None:
                    stage = "semantic"
                    out = self._semantic(query, keys, decision)
            except StoreUnavailable as e:
                out = LookupOutcome(ResultKind.UNAVAILABLE, reason=str(e))
        self._record_lookup(query.scope.tenant, stage, out, time.perf_counter() - t0)
        return out

    def _record_lookup(self, tenant: str, stage: str, out: LookupOutcome, seconds: float) -> None:
        result = out.kind.name.lower()
        m = self.metrics
        m.lookups.labels(stage, result).inc()
        m.lookup_seconds.labels(result).observe(seconds)
        if out.kind in (ResultKind.EXACT, ResultKind.SEMANTIC):
            m.hit_similarity.labels(result).observe(out.similarity)
            m.tally(tenant, "exact_hits" if out.kind == ResultKind.EXACT else "semantic_hits")
        elif out.kind == ResultKind.MISS:
            m.tally(tenant, "misses")

    def _exact(self, query: Query, keys: QueryKeys) -> LookupOutcome | None:
        found = self.store.get_fitting([keys.stop_id, keys.length_id], query.scope.tenant,
                                       query.max_tokens, self._refresh_ms())
        if found is None:
            return None
        entry_id, meta = found
        return LookupOutcome(ResultKind.EXACT, decode_answer(meta)[0], entry_id, 1.0)

    def _semantic(self, query: Query, keys: QueryKeys, decision: Decision) -> LookupOutcome:
        if keys.group is None or keys.semantic_text is None:
            return LookupOutcome(ResultKind.MISS, reason="no exact match; last message is not "
                                 "a user turn")
        if self.index.group_size(keys.group) == 0:  # skip the embedding: nothing to compare
            return LookupOutcome(ResultKind.MISS, reason="no exact match; no semantic entries "
                                 "in scope")
        vec = self.embedder.embed([keys.semantic_text])[0]
        cands, best = self.index.search(keys.group, vec, decision.threshold,
                                        self.config.semantic_candidates)
        if not cands:
            self.metrics.semantic_rejections.labels("threshold").inc()
            return LookupOutcome(ResultKind.MISS, similarity=best,
                                 reason=f"below threshold {decision.threshold:.3f}")
        fetched = self.store.fetch([c.entry_id for c in cands])
        query_features = self.guard.features(keys.semantic_text)
        reasons: list[str] = []
        for cand, entry in zip(cands, fetched):
            why = self._reject(query, query_features, cand.entry_id, entry)
            if why:
                reasons.append(f"{why} (similarity {cand.score:.3f})")
                continue
            answer, _ = decode_answer(entry.meta)  # type: ignore[union-attr]
            self._touch(query, cand.entry_id)
            return LookupOutcome(ResultKind.SEMANTIC, answer, cand.entry_id, cand.score)
        return LookupOutcome(ResultKind.MISS, similarity=best, reason="; ".join(reasons))

    def _reject(self, query: Query, query_features: TextFeatures, entry_id: str,
                entry: Fetched | None) -> str:
        """Why a semantic candidate cannot be served; empty if it can."""
        if entry is None:
            self._drop_stale(entry_id)
            self.metrics.semantic_rejections.labels("expired").inc()
            return "candidate expired"
        answer, stored_max = decode_answer(entry.meta)
        if not fits(answer, stored_max, query.max_tokens):
            self.metrics.semantic_rejections.labels("max_tokens").inc()
            need = (f"{stored_max}" if answer.finish_reason == FinishReason.LENGTH
                    else f">= {answer.usage.completion_tokens}")
            return f"candidate needs max_tokens {need}"
        verdict = self.guard.compare(query_features, self.guard.features(entry.query_text))
        if not verdict.ok:
            self.metrics.semantic_rejections.labels(verdict.rule).inc()
            # The detail quotes words of both prompts (numbers, names): the reason reaches span
            # attributes, so it carries them only where the operator allows request text.
            if self.config.record_request_text:
                return f"{verdict.rule} mismatch: {verdict.detail}"
            return f"{verdict.rule} mismatch"
        return ""

    def _refresh_ms(self) -> int | None:
        return int(self.config.ttl_s * 1000) if self.config.refresh_ttl_on_hit else None

    def _touch(self, query: Query, entry_id: str) -> None:
        self.store.touch(query.scope.tenant, entry_id, self._refresh_ms())

    def _drop_stale(self, entry_id: str) -> None:
        # The index outlived the entry (expired before the sweep, or lost with Redis).
        self.index.remove(entry_id)
        try:
            self.metrics.evicted("expired", len(self.store.remove([entry_id])))
        except StoreUnavailable:
            pass

    # Store ----------------------------------------------------------------------------------

    def store_answer(self, query: Query, answer: Answer, policy: Policy) -> StoreOutcome:
        """Stores an answer if the policy and the answer allow. Raises InvalidArgument."""
        validate(query)
        out, drop_reason = self._store(query, answer, decide(query, policy, self.config))
        tenant = query.scope.tenant
        if out.stored:
            self.metrics.stores.inc()
            self.metrics.tally(tenant, "stores")
        else:
            self.metrics.dropped_stores.labels(drop_reason).inc()
            self.metrics.tally(tenant, "dropped_stores")
        return out

    def _store(self, query: Query, answer: Answer,
               decision: Decision) -> tuple[StoreOutcome, str]:
        if not decision.store:
            return StoreOutcome(False, reason=decision.store_reason), "policy"
        if answer.finish_reason not in _STORABLE:
            return StoreOutcome(False, reason=f"finish_reason {answer.finish_reason.name}"), \
                "finish_reason"
        if self.store.backing_off():  # don't spend an embedding on a store that will fail
            return StoreOutcome(False, reason="store unavailable"), "unavailable"
        keys = query_keys(query, self.config.default_temperature)
        stop = answer.finish_reason == FinishReason.STOP
        entry_id = keys.stop_id if stop else keys.length_id
        vec = None
        if self.config.semantic_enabled and keys.group and keys.semantic_text is not None:
            vec = self.embedder.embed([keys.semantic_text])[0]
        s = query.scope
        rec = Record(entry_id, s.tenant, s.model_version, s.prompt_version,
                     encode_answer(answer, query.max_tokens, time.time() * 1000),
                     "S" if stop else "L", answer.usage.completion_tokens, query.max_tokens,
                     keys.semantic_text or "", keys.group if vec is not None else "",
                     vec.tobytes() if vec is not None else b"")
        try:
            evicted = self.store.put(rec, int(self.config.ttl_s * 1000),
                                     self.config.max_entries_per_tenant)
        except StoreUnavailable:
            return StoreOutcome(False, reason="store unavailable"), "unavailable"
        if vec is not None:  # this replica sees it now; others via the pub/sub event
            self.index.add(entry_id, rec.group, vec)
        for e in evicted:
            self.index.remove(e)
        self.metrics.evicted("lru", len(evicted))
        return StoreOutcome(True, entry_id), ""

    # Invalidate / stats ---------------------------------------------------------------------

    def invalidate(self, target: InvalidateTarget) -> int:
        """Removes matching entries; returns how many. Raises StoreUnavailable, InvalidArgument."""
        kind = target.kind
        if target.tenant_filter and kind in (InvalidateKind.TENANT, InvalidateKind.ENTRY_ID):
            raise InvalidArgument("tenant_filter", f"not allowed with the {kind.value} target")
        if kind == InvalidateKind.ENTRY_ID:
            ids = [target.value]
        elif kind == InvalidateKind.TENANT:
            ids = self.store.tenant_ids(target.value)
        else:
            prefix = "mv" if kind == InvalidateKind.MODEL_VERSION else "pv"
            ids = self.store.version_ids(prefix, target.value)
        removed = self.store.remove(ids, target.tenant_filter)
        for entry_id in removed:
            self.index.remove(entry_id)
        self.metrics.invalidated.labels(kind.value).inc(len(removed))
        logger.info("invalidated %d entries (%s=%r, tenant_filter=%r)", len(removed),
                    kind.value, target.value, target.tenant_filter)
        return len(removed)

    def stats(self, tenant: str) -> CacheStats:
        """Counters of one tenant, or of all (tenant ""). Never raises for Redis failures."""
        counts = self.metrics.tenant_counts(tenant or None)
        try:
            entries = self.store.count(tenant or None)
        except StoreUnavailable:
            entries = 0
        return CacheStats(entries=entries, redis_errors=self.metrics.redis_error_total,
                          evictions=self.metrics.eviction_total,
                          redis_available=self.store.available, **counts)
