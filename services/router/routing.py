"""The router's request path: limits -> cache -> tier decision -> dispatch -> accounting.

`Router.generate` is an async generator of domain events (Chunk..., Final) shared by the gRPC
service and the OpenAI API. Every step records itself in the request's RouteInfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass

from services.router.cache_client import CacheClient, CachedAnswer, LookupResult
from services.router.classifier import DifficultyClassifier
from services.router.config import RouterConfig, TenantConfig
from services.router.dispatch import Dispatcher, WorkerDone
from services.router.domain import (
    CacheResult,
    Chunk,
    Event,
    Final,
    FinishReason,
    GenerateRequest,
    RouteInfo,
    Tier,
    Timings,
    Usage,
)
from services.router.errors import Overloaded, PermissionDenied, RateLimited, RouterError
from services.router.limits import Limits, estimate_prompt_tokens
from services.router.metrics import RouterMetrics
from services.router.slo import Latency, meets
from services.router.tracing import NOOP, RequestTrace, end_error
from services.router.validation import validate_request

logger = logging.getLogger(__name__)


@dataclass
class _Clock:
    """Router-side timestamps of one request (time.monotonic seconds)."""

    arrival: float
    dispatched: float | None = None
    first_token: float | None = None

    def ms(self, t: float | None) -> float:
        return 0.0 if t is None else (t - self.arrival) * 1000.0


@dataclass(frozen=True)
class Plan:
    """Where a request goes: tiers in order, how it was decided, and whether to cascade."""

    tiers: tuple[Tier, ...]
    route: str
    cascade_to: tuple[Tier, ...] = ()


class Router:
    def __init__(self, config: RouterConfig, dispatcher: Dispatcher, cache: CacheClient | None,
                 classifier: DifficultyClassifier | None, limits: Limits, metrics: RouterMetrics,
                 executor: Executor, tracer=NOOP):
        self.config = config
        self.dispatcher = dispatcher
        self.cache = cache
        self.classifier = classifier
        self.limits = limits
        self.metrics = metrics
        self.executor = executor
        self.tracer = tracer
        self.tenants = {t.name: t for t in config.tenants}
        self.in_flight = 0
        """Requests inside `generate` now (every tenant, API and stage)."""

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        clock = _Clock(time.monotonic())
        tr = RequestTrace(self.tracer, req)
        route = RouteInfo()
        outcome = "error"
        final: Final | None = None
        error: BaseException | None = None
        if self.in_flight >= self.config.max_in_flight:
            self.metrics.rejections.labels("max_in_flight").inc()
            self.metrics.requests.labels(req.api, "Overloaded").inc()
            exc = Overloaded(f"the router has {self.in_flight} requests in flight; limit "
                             f"max_in_flight={self.config.max_in_flight}", limit="max_in_flight")
            tr.finish(route, None, exc)
            raise exc
        self.in_flight += 1
        try:
            async for event in self._generate(req, clock, route, tr):
                if isinstance(event, Final):
                    final = event
                yield event
            outcome = "ok"
        except RouterError as exc:
            outcome, error = type(exc).__name__, exc
            if isinstance(exc, Overloaded):
                self.metrics.rejections.labels(exc.limit).inc()
            raise
        except (asyncio.CancelledError, GeneratorExit) as exc:
            outcome, error = "cancelled", exc
            raise
        except Exception as exc:
            error = exc
            raise
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(req.api, outcome).inc()
            tr.finish(route, final, error)

    async def _generate(self, req: GenerateRequest, clock: _Clock, route: RouteInfo,
                        tr: RequestTrace) -> AsyncIterator[Event]:
        tenant = self.tenants[req.tenant]
        validate_request(req, self.config.max_prompt_chars)
        deadline = clock.arrival + self.config.request_timeout_s
        if req.deadline is not None:
            deadline = min(deadline, req.deadline)
        req, hint_note = self._effective_hint(req, tenant)
        try:
            ticket = self.limits.admit(tenant.name, estimate_prompt_tokens(
                len(req.prompt or "") + sum(len(m.content) for m in req.messages or ()))
                + req.max_tokens)
        except RateLimited as exc:
            self.metrics.rejections.labels(exc.limit).inc()
            raise
        used: int | None = None
        try:
            hit = await self._lookup(req, tenant, route, deadline, tr)
            if hit is not None:
                clock.dispatched = clock.first_token = time.monotonic()
                yield Chunk(hit.text, hit.token_ids)
                used = 0
                yield self._finish(req, route, clock, hit.finish_reason, hit.stop_reason,
                                   hit.usage, tr)
                return
            plan = await self._decide(req, tenant, route, hint_note, tr)
            if plan.cascade_to:
                final = None
                async for event in self._cascade(req, plan, route, clock, deadline, tr):
                    final = event
                    yield event
            else:
                final = None
                async for event in self._serve(req, plan.tiers, route, clock, deadline, tr):
                    final = event
                    yield event
            if isinstance(final, Final):
                used = final.usage.prompt_tokens + final.usage.completion_tokens
        finally:
            ticket.release(used)

    # --- decisions ---------------------------------------------------------------------------

    def _effective_hint(self, req: GenerateRequest,
                        tenant: TenantConfig) -> tuple[GenerateRequest, str]:
        hint = req.tier_hint
        if hint is None:
            return req, ""
        if not tenant.allow_tier_hint:
            return dataclasses.replace(req, tier_hint=None), "hint ignored (tenant disallows)"
        if hint not in tenant.allowed_tiers:
            self.metrics.rejections.labels("tier_not_allowed").inc()
            raise PermissionDenied(f"tier_hint: tenant {tenant.name!r} may not use tier "
                                   f"{hint.label!r} (allowed: "
                                   f"{sorted(t.label for t in tenant.allowed_tiers)})")
        return req, ""

    async def _lookup(self, req: GenerateRequest, tenant: TenantConfig, route: RouteInfo,
                      deadline: float, tr: RequestTrace) -> CachedAnswer | None:
        if self.cache is None or not tenant.cache:
            return None
        result: LookupResult = await self.cache.lookup(req, deadline, tr)
        route.cache_result = result.result
        route.cache_similarity = result.similarity
        self.metrics.cache_results.labels(result.result.name.lower()).inc()
        if result.answer is None:
            return None
        a = result.answer
        route.tier, route.model_id, route.route = a.tier, a.model_id, "cache"
        route.decision_reason = (f"cache: {result.result.name.lower()} hit"
                                 + ("" if result.result == CacheResult.EXACT
                                    else f" (similarity {result.similarity:.3f})"))
        return a

    async def _decide(self, req: GenerateRequest, tenant: TenantConfig, route: RouteInfo,
                      hint_note: str, tr: RequestTrace) -> Plan:
        allowed = tenant.allowed_tiers
        if req.tier_hint is not None:
            tier, route.route, route.decision_reason = req.tier_hint, "hint", "hint"
        elif self.classifier is not None:
            start = time.perf_counter()
            span = tr.child("router.classify")
            try:
                decision = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.classifier.classify, req.classifier_text,
                    tenant.thresholds)
            except BaseException as exc:
                end_error(span, exc)
                span.end()
                raise
            span.set_attributes({"switchyard.classifier.score": decision.score,
                                 "switchyard.classifier.tier": decision.tier.label,
                                 "switchyard.classifier.reason": decision.reason})
            span.end()
            self.metrics.classifier_seconds.observe(time.perf_counter() - start)
            tier, route.route = decision.tier, "classifier"
            route.difficulty_score, route.classified_tier = decision.score, decision.tier
            route.decision_reason = decision.reason
        else:
            tier, route.route = Tier.parse(self.config.classifier.default_tier), "default"
            route.decision_reason = "default tier (classifier off)"
        if hint_note:
            route.decision_reason = f"{hint_note}; {route.decision_reason}"
        if tier not in allowed:
            nearest = min(allowed, key=lambda t: (abs(t - tier), -t))
            route.decision_reason += f"; {tier.label} not allowed for tenant -> {nearest.label}"
            tier = nearest
        self.metrics.decisions.labels(route.route, tier.label).inc()
        tiers = tuple(t for t in self.config.fallback_order(tier) if t in allowed)
        cascade = self.config.cascade
        small, large = Tier.parse(cascade.from_tier), Tier.parse(cascade.to_tier)
        if (tenant.cascade and not req.stream and req.tier_hint is None and tier != large
                and small in allowed and large in allowed):
            route.route = "cascade"
            return Plan(tiers=(small,), route="cascade",
                        cascade_to=tuple(t for t in self.config.fallback_order(large)
                                         if t in allowed))
        return Plan(tiers=tiers, route=route.route)

    # --- serving -----------------------------------------------------------------------------

    async def _serve(self, req: GenerateRequest, tiers: tuple[Tier, ...], route: RouteInfo,
                     clock: _Clock, deadline: float, tr: RequestTrace) -> AsyncIterator[Event]:
        done: WorkerDone | None = None
        texts: list[str] = []
        ids: list[int] = []
        clock.dispatched = time.monotonic()
        self.metrics.overhead.observe(clock.dispatched - clock.arrival)
        async with contextlib.aclosing(self.dispatcher.run(req, tiers, route, deadline,
                                                           trace=tr)) as run:
            async for event in run:
                if isinstance(event, WorkerDone):
                    done = event
                    break
                if clock.first_token is None and (event.text or event.token_ids):
                    clock.first_token = time.monotonic()
                texts.append(event.text)
                ids.extend(event.token_ids)
                yield event
        assert done is not None, "the dispatcher ends with WorkerDone or raises"
        self._note_fallback(route, tiers)
        final = self._finish(req, route, clock, done.finish_reason, done.stop_reason, done.usage,
                             tr)
        if self.cache is not None and done.finish_reason != FinishReason.ABORT:
            self.cache.store_later(req, CachedAnswer(
                "".join(texts), tuple(ids), done.usage, route.tier, done.model_id,
                done.finish_reason, done.stop_reason), tr)
        yield final

    async def _cascade(self, req: GenerateRequest, plan: Plan, route: RouteInfo, clock: _Clock,
                       deadline: float, tr: RequestTrace) -> AsyncIterator[Event]:
        """Non-streaming: answer on the small tier with logprobs; keep it when its mean token
        logprob reaches the threshold, else answer again on the large tier."""
        want = req.sampling.logprobs
        probe = dataclasses.replace(req, sampling=dataclasses.replace(
            req.sampling, logprobs=0 if want is None else want))
        chunks: list[Chunk] = []
        final: Final | None = None
        async for event in self._serve(probe, plan.tiers, route, clock, deadline, tr):
            if isinstance(event, Final):
                final = event
            else:
                chunks.append(event)
        lps = [lp.logprob for c in chunks for lp in c.logprobs]
        mean = sum(lps) / len(lps) if lps else 0.0
        threshold = self.config.cascade.min_mean_logprob
        small = route.tier.label if route.tier else "?"
        if mean >= threshold:
            route.decision_reason += (f"; cascade: kept {small} answer (mean logprob "
                                      f"{mean:.2f} >= {threshold:.2f})")
            for c in chunks:
                yield c if want is not None else Chunk(c.text, c.token_ids)
            if self.cache is not None and final.finish_reason != FinishReason.ABORT:
                # The probe asked for logprobs, so _serve did not store it; the answer is the
                # client's as asked.
                self.cache.store_later(req, CachedAnswer(
                    "".join(c.text for c in chunks), tuple(t for c in chunks for t in c.token_ids),
                    final.usage, route.tier, route.model_id, final.finish_reason,
                    final.stop_reason), tr)
            yield final
            return
        self.metrics.escalations.inc()
        route.decision_reason += (f"; cascade: escalated from {small} (mean logprob {mean:.2f} "
                                  f"< {threshold:.2f})")
        clock.first_token = None
        async for event in self._serve(req, plan.cascade_to, route, clock, deadline, tr):
            yield event

    def _note_fallback(self, route: RouteInfo, tiers: tuple[Tier, ...]) -> None:
        if route.fallback and route.tier is not None:
            self.metrics.fallbacks.labels(tiers[0].label, route.tier.label).inc()
            route.decision_reason += f"; fallback: no healthy {tiers[0].label} replica"
        if route.retries and route.tier is not None:
            self.metrics.retries.labels(route.tier.label).inc(route.retries)

    def _finish(self, req: GenerateRequest, route: RouteInfo, clock: _Clock,
                finish: FinishReason, stop_reason: str, usage: Usage, tr: RequestTrace) -> Final:
        now = time.monotonic()
        first = clock.first_token or now
        timings = Timings(queue_ms=clock.ms(clock.dispatched), ttft_ms=clock.ms(first),
                          decode_ms=(now - first) * 1000.0, total_ms=clock.ms(now))
        if route.tier is not None:
            cfg = self.config.tier(route.tier)
            latency = Latency.measure(timings.ttft_ms, timings.total_ms, usage.completion_tokens)
            met = cfg is not None and meets(latency, cfg.slo)
            self.metrics.observe_latency(route.tier.label, route.route, latency, met)
            tr.slo_met, tr.latency = met, latency
        return Final(finish, stop_reason, usage, timings, route, req.request_id)
