"""gRPC channel and server options shared by every hop: message size limits and keepalive.

Keepalive is what notices a peer that went silent without closing its connection (a frozen
process, a host whose packets are dropped): the client pings every `keepalive_time_s` and,
when no ack comes within `keepalive_timeout_s`, closes the transport so every call on it
fails with UNAVAILABLE instead of waiting for its deadline. Servers must accept pings that
often, or they answer with GOAWAY ("too_many_pings") and the client backs off its pings.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest message accepted on any hop (prompts are capped well below it)."""

MIN_PING_INTERVAL_MS = 1000
"""The shortest client ping interval servers accept without counting a strike."""

INITIAL_RECONNECT_BACKOFF_MS = 200
MAX_RECONNECT_BACKOFF_MS = 2000


@dataclass(frozen=True)
class Keepalive:
    """Client-side HTTP/2 keepalive."""

    time_s: float = 10.0
    """Ping the peer after this long without a ping ack."""
    timeout_s: float = 5.0
    """Close the transport when a ping is not acknowledged within this."""

    def __post_init__(self) -> None:
        if not self.time_s * 1000 >= MIN_PING_INTERVAL_MS:
            raise ValueError(f"keepalive time_s: must be >= {MIN_PING_INTERVAL_MS / 1000} "
                             f"(the servers' minimum ping interval), got {self.time_s!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"keepalive timeout_s: must be > 0, got {self.timeout_s!r}")


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of every Switchyard gRPC server."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Accept the clients' keepalive pings, also between calls.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options(keepalive: Keepalive | None = None,
                    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of every Switchyard client channel; `keepalive` None = no pings."""
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC's reconnect backoff grows to 120 s by default: a peer that was down for a
            # minute would stay unreachable long after it came back. Within a cluster, retry
            # often: a connection attempt is cheap.
            ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
    if keepalive is not None:
        opts += [
            ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
            # A keepalive ping that finds another ping in flight (a BDP probe, sent as data
            # arrives) waits on that one, whose timeout is 60 s by default: measured, a frozen
            # peer then went unnoticed until the call's deadline. Bound every ping instead.
            ("grpc.http2.ping_timeout_ms", int(keepalive.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Pings are the point: send them even when no data frames are flowing.
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return opts
