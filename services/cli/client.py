"""`switchyard ask / chat / status`: a gRPC client of the router, and a cluster overview.

`ask` streams one answer and then shows its route (tier, replica, cache result, classifier
score, timings); `chat` keeps a conversation going turn after turn; `status` asks every worker
for its load, the cache for its counters and the router's /metrics for SLO attainment.
"""

from __future__ import annotations

import sys
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import TextIO

import grpc
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.cli.config import ClusterConfig

_ROLES = {"system": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER,
          "assistant": common_pb2.ROLE_ASSISTANT}
TIER_HINTS = {"auto": common_pb2.TIER_UNSPECIFIED, "small": common_pb2.TIER_SMALL,
              "quantized": common_pb2.TIER_QUANTIZED, "large": common_pb2.TIER_LARGE}


@dataclass(frozen=True)
class AskOptions:
    """What every request of an ask or chat session carries."""

    target: str
    """host:port of the router's gRPC endpoint."""
    api_key: str
    tier: str = "auto"
    max_tokens: int = 128
    temperature: float = 0.0
    timeout_s: float = 300.0


def _tier_label(tier: int) -> str:
    return common_pb2.Tier.Name(tier).removeprefix("TIER_").lower()


def describe_route(final: router_pb2.Final) -> str:
    """Two lines: where the request went and why, then tokens and timings."""
    r, t, u = final.route, final.timings, final.usage
    cache = common_pb2.CacheResult.Name(r.cache_result).removeprefix("CACHE_RESULT_").lower()
    if r.cache_result == common_pb2.CACHE_RESULT_SEMANTIC:
        cache += f" (similarity {r.cache_similarity:.2f})"
    parts = [f"tier {_tier_label(r.tier)}", f"replica {r.replica or '-'}",
             f"model {r.model_id or '-'}", f"cache {cache}"]
    if r.HasField("difficulty_score"):
        parts.append(f"difficulty {r.difficulty_score:.2f} -> "
                     f"{_tier_label(r.classified_tier)}")
    if r.decision_reason:
        parts.append(f"reason: {r.decision_reason}")
    if r.fallback:
        tried = ", ".join(_tier_label(x) for x in r.attempted_tiers)
        parts.append(f"fallback (tried {tried})")
    if r.retries:
        parts.append(f"{r.retries} retr{'y' if r.retries == 1 else 'ies'}")
    finish = common_pb2.FinishReason.Name(final.finish_reason).removeprefix(
        "FINISH_REASON_").lower()
    timing = (f"TTFT {t.ttft_ms:.0f} ms, queue {t.queue_ms:.0f} ms, decode {t.decode_ms:.0f} ms,"
              f" total {t.total_ms:.0f} ms | {u.prompt_tokens} prompt + {u.completion_tokens} "
              f"completion tokens ({u.cached_prompt_tokens} cached) | {finish}")
    return "route: " + " | ".join(parts) + "\n" + "timing: " + timing


def generate(stub: router_pb2_grpc.RouterServiceStub, messages: list[tuple[str, str]],
             opts: AskOptions, out: TextIO) -> tuple[str, router_pb2.Final]:
    """Streams one answer to `out`; returns its text and the Final message."""
    req = router_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex,
        chat=common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role=_ROLES[role], content=text) for role, text in messages]),
        sampling=common_pb2.SamplingParams(temperature=opts.temperature),
        max_tokens=opts.max_tokens, tier_hint=TIER_HINTS[opts.tier])
    text: list[str] = []
    final = None
    for resp in stub.Generate(req, timeout=opts.timeout_s,
                              metadata=(("authorization", f"Bearer {opts.api_key}"),)):
        if resp.WhichOneof("kind") == "chunk":
            text.append(resp.chunk.text)
            out.write(resp.chunk.text)
            out.flush()
        else:
            final = resp.final
    if final is None:
        raise RuntimeError("the router's stream ended without a final message")
    return "".join(text), final


def ask(opts: AskOptions, prompt: str, out: TextIO = sys.stdout) -> int:
    with grpc.insecure_channel(opts.target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        try:
            _, final = generate(stub, [("user", prompt)], opts, out)
        except grpc.RpcError as exc:
            print(f"\n{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    out.write("\n" + describe_route(final) + "\n")
    return 0


def chat(opts: AskOptions, read=input, out: TextIO = sys.stdout) -> int:
    """A conversation: each turn sends the whole history. Empty line or /quit ends it."""
    history: list[tuple[str, str]] = []
    with grpc.insecure_channel(opts.target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                break
            if not line or line in ("/quit", "/exit"):
                break
            history.append(("user", line))
            out.write("switchyard> ")
            try:
                text, final = generate(stub, history, opts, out)
            except grpc.RpcError as exc:
                print(f"\n{exc.code().name}: {exc.details()}", file=sys.stderr)
                history.pop()
                continue
            history.append(("assistant", text))
            out.write("\n" + describe_route(final) + "\n\n")
    return 0


def _worker_rows(config: ClusterConfig) -> list[list[str]]:
    rows = []
    for t in config.tiers:
        for i, port in enumerate(t.local_ports()):
            address = f"{config.host}:{port}"
            with grpc.insecure_channel(address) as ch:
                try:
                    m = worker_pb2_grpc.WorkerServiceStub(ch).GetLoad(
                        worker_pb2.GetLoadRequest(), timeout=2)
                except grpc.RpcError as exc:
                    rows.append([t.name, f"{t.name}-{i}", address, f"down ({exc.code().name})",
                                 "", "", "", ""])
                    continue
            kv = 1 - m.kv_blocks_free / m.kv_blocks_total if m.kv_blocks_total else 0.0
            rows.append([t.name, m.worker_id, address, "serving" if m.serving else "not serving",
                         str(m.num_running), str(m.num_waiting), f"{kv:.0%}", m.model_id])
    return rows


def _cache_line(config: ClusterConfig) -> str:
    if not config.cache.enabled:
        return "cache: off"
    target = f"{config.host}:{config.cache.port}"
    with grpc.insecure_channel(target) as ch:
        try:
            s = cache_pb2_grpc.CacheServiceStub(ch).Stats(cache_pb2.StatsRequest(), timeout=2)
        except grpc.RpcError as exc:
            return f"cache {target}: down ({exc.code().name})"
    lookups = s.exact_hits + s.semantic_hits + s.misses
    rate = f"{(s.exact_hits + s.semantic_hits) / lookups:.1%}" if lookups else "-"
    return (f"cache {target}: {s.entries} entries | {lookups} lookups: {s.exact_hits} exact, "
            f"{s.semantic_hits} semantic, {s.misses} miss (hit rate {rate}) | "
            f"redis {'up' if s.redis_available else 'DOWN'}")


def slo_attainment(metrics_text: str) -> dict[str, tuple[float, float]]:
    """Tier -> (requests that met both SLO targets, requests evaluated), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    met: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "switchyard_router_goodput_requests_total":
                met[s.labels["tier"]] += s.value
            elif s.name == "switchyard_router_slo_requests_total":
                total[s.labels["tier"]] += s.value
    return {tier: (met[tier], total[tier]) for tier in total}


def status(config: ClusterConfig, out: TextIO = sys.stdout) -> int:
    rows = [["tier", "replica", "address", "state", "running", "waiting", "kv used", "model"]]
    rows += _worker_rows(config)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.write("\n" + _cache_line(config) + "\n")
    url = f"http://{config.host}:{config.router.http_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            slo = slo_attainment(resp.read().decode())
    except OSError as exc:
        out.write(f"router {url}: down ({exc})\n")
        return 1
    if not slo:
        out.write("SLO attainment: no finished requests yet\n")
    for tier, (met, total) in sorted(slo.items()):
        out.write(f"SLO attainment, {tier}: {met:.0f} of {total:.0f} requests met TTFT and "
                  f"TPOT targets ({met / total:.1%})\n")
    return 0
