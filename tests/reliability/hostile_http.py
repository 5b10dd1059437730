"""Shared by the hostile HTTP tests (test_hostile_http_random.py, test_hostile_http_cases.py):
the router they call, raw HTTP requests, and the checks every answer must pass.

Requests go through http.client (so malformed bodies and headers reach the server as sent)
to a router of each module's own, over the session's real workers and cache service. TALLY
counts the inputs tried; each module resets it at its start and reports it at its end.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket

from tests.reliability.hostile import Tally
from tests.router.conftest import KEYS, router_config

MAX_BODY_BYTES = 1024 * 1024
"""This module's router body limit (the default is 4 MiB)."""
ERROR_STATUSES = {400, 401, 403, 404, 405, 413, 422, 429}
"""Clear client errors: anything else (5xx above all) fails the test."""
CLIENT_TIMEOUT_S = 60.0
"""A request not answered within this is a hang."""
TALLY = Tally()


def start_api(cluster, make_router, cache_target):
    """A router with the standard test tenants in a permission scope of their own (this
    module's cache entries never answer another module's requests) and a 1 MiB body limit."""
    base = {"acme": {}, "limited": {"max_concurrent": 1, "tokens_per_minute": 600},
            "smallonly": {"allowed_tiers": ["small"]}}
    tenants = {name: {"api_keys": [KEYS[name]], "permission_scope": "hostile", **extra}
               for name, extra in base.items()}
    return make_router(router_config(
        {"small": [w.address for w in cluster["small"]], "quantized": [cluster["quantized_dead"]],
         "large": [w.address for w in cluster["large"]]},
        cache_target=cache_target, tenants=tenants, max_body_bytes=MAX_BODY_BYTES))


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def send(router, path: str, body: bytes | None = None, *, method: str = "POST",
         tenant: str | None = "acme", headers: dict | None = None, chunked: bool = False,
         timeout: float = CLIENT_TIMEOUT_S) -> Reply:
    """One request on a fresh connection; a timeout is reported as a hang."""
    h: dict = {"Content-Type": "application/json"}
    if tenant is not None:
        h["Authorization"] = f"Bearer {KEYS[tenant]}"
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", router.server.http_port, timeout=timeout)
    try:
        if chunked:
            conn.request(method, path, body=iter([body[i:i + 65536]
                                                  for i in range(0, len(body), 65536)]),
                         headers=h, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read()
    except (TimeoutError, socket.timeout):
        TALLY.crash("http")
        raise AssertionError(f"{method} {path}: no answer within {timeout} s (hang)") from None
    finally:
        conn.close()
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)


def post_json(router, path: str, obj, *, escape: bool = True, **kw) -> Reply:
    # allow_nan: NaN / Infinity literals are what a hostile client sends (Python's json
    # accepts them on the way in). escape: non-ASCII as \uXXXX (lone surrogates need
    # it), else send UTF-8.
    text = json.dumps(obj, allow_nan=True, ensure_ascii=escape)
    return send(router, path, text.encode("utf-8"), **kw)


def assert_error_shape(r: Reply) -> dict:
    assert r.headers.get("content-type", "").startswith("application/json"), r
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    assert len(r.body) < 64 * 1024, "error messages must not echo huge input"
    return err


def _sse_events(body: bytes) -> list:
    events = []
    for block in body.split(b"\n\n"):
        if not block.strip():
            continue
        assert block.startswith(b"data: "), block[:200]
        payload = block[len(b"data: "):]
        events.append(payload if payload == b"[DONE]" else json.loads(payload))
    return events


def check(r: Reply, api: str = "http") -> Reply:
    """A well-formed completion (JSON or SSE) or a clear client error; counts the input."""
    TALLY.tried_one(api, str(r.status))
    if r.status >= 500 or (r.status != 200 and r.status not in ERROR_STATUSES):
        TALLY.crash(api)
        raise AssertionError(f"status {r.status}: {r.body[:500]!r}")
    if r.status != 200:
        assert_error_shape(r)
        if r.status == 429:
            assert int(r.headers["retry-after"]) >= 1
        return r
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = _sse_events(r.body)
        assert events and events[-1] == b"[DONE]", events[-3:]
        assert all(isinstance(e, dict) and "error" not in e for e in events[:-1]), events
    else:
        body = r.json()
        assert body["object"] in ("chat.completion", "text_completion"), body
        assert len(body["choices"]) == 1 and body["usage"]["total_tokens"] >= 1, body
    return r


def expect(r: Reply, status: int, param: str | None = None, api: str = "http") -> dict:
    check(r, api)
    assert r.status == status, (r.status, r.body[:500])
    err = assert_error_shape(r)
    if param is not None:
        assert err["param"] == param, err
    return err


QUESTION = [{"role": "user", "content": "Name a primary color."}]


def assert_serving(router) -> None:
    """A normal request right after a hostile batch still gets its answer."""
    r = post_json(router, "/v1/chat/completions", {
        "model": "auto", "messages": QUESTION, "max_tokens": 3, "temperature": 0})
    assert r.status == 200, (r.status, r.body[:500])
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
