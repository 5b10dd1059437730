"""TLS and mTLS on every gRPC hop, with real processes over loopback:

- a worker process, the cache service and the router each serve mTLS on their main port, and
  grpc.health.v1 alone in plaintext on a separate health port (Kubernetes probes), with one
  status for both;
- router -> worker and router -> cache run over mTLS: a real Generate through the router is
  answered by the worker, stored, and served again from the cache;
- refused: a client without a certificate, a client certificate from another CA, a client
  that trusts another CA, and plaintext to a TLS port;
- the health port serves nothing but health;
- bad certificate settings fail with the setting's name, before anything listens.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.tls import (ClientTls, ServerTls, TlsError, add_port, channel_credentials,
                                 server_credentials, sync_channel)
from services.cli.config import ClusterConfig
from services.cli.config import ConfigError as ClusterConfigError
from services.router.config import ConfigError, RouterConfig
from tests.reliability.certs import NAMED_HOST, Pki, make_pki
from tests.reliability.parts import ConfiguredWorker, health_status, refusal, start_cache
from tests.router.conftest import free_port, router_config
from tests.router.helpers import md, request

SMALL = common_pb2.TIER_SMALL


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server(pki: Pki) -> dict:
    s = pki.server_tls()
    return {"cert_file": s.cert_file, "key_file": s.key_file, "ca_file": s.ca_file,
            "require_client_cert": True}


def _client(pki: Pki) -> dict:
    return {"ca_file": pki.ca, "cert_file": pki.client[0], "key_file": pki.client[1]}


@pytest.fixture(scope="module")
def worker(pki, tiny_models, tmp_path_factory) -> Iterator[ConfiguredWorker]:
    """A worker process serving mTLS, with its plaintext health port."""
    w = ConfiguredWorker(str(tiny_models[0]), "tls-0", tmp_path_factory.mktemp("tls-worker"),
                         {"tls": _server(pki), "health_port": free_port()},
                         client_tls=pki.client_tls())
    w.wait_serving()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def cache(pki, redis_url):
    """The cache service serving mTLS, with its plaintext health port."""
    tls = pki.server_tls()
    server = start_cache(redis_url, tls_cert_file=tls.cert_file, tls_key_file=tls.key_file,
                         tls_ca_file=tls.ca_file, tls_require_client_cert=True, health_port=0)
    yield server
    server.stop(0.5)


@pytest.fixture(scope="module")
def router(pki, worker, cache, make_router):
    """A router serving mTLS that reaches the worker and the cache over mTLS."""
    config = router_config({"small": [worker.address]}, cache_target=f"127.0.0.1:{cache.port}",
                           tls={"server": _server(pki), "health_port": 0,
                                "workers": _client(pki), "cache": _client(pki)})
    return make_router(config)


def _router_stub(router, tls: ClientTls | None) -> router_pb2_grpc.RouterServiceStub:
    return router_pb2_grpc.RouterServiceStub(sync_channel(router.grpc_target, [], tls))


def _targets(worker, cache, router) -> dict[str, tuple[str, str]]:
    """Service -> (main target, health-port target)."""
    return {"worker": (worker.address, f"127.0.0.1:{worker.settings['health_port']}"),
            "cache": (f"127.0.0.1:{cache.port}", f"127.0.0.1:{cache.health_port}"),
            "router": (router.grpc_target, f"127.0.0.1:{router.server.health_port}")}


def test_generate_through_the_router_over_mtls_end_to_end(pki, router, worker):
    stub = _router_stub(router, pki.client_tls())
    req = request(chat=[("user", "Name three primary colours.")], max_tokens=6, hint=SMALL,
                  prompt_version="tls@1")
    msgs = list(stub.Generate(req, metadata=md(), timeout=60))
    final = msgs[-1].final
    assert msgs[-1].WhichOneof("kind") == "final" and len(msgs) > 1
    assert final.route.replica == "tls-0"  # the worker answered, over router -> worker mTLS
    assert final.route.cache_result == common_pb2.CACHE_RESULT_MISS  # the lookup got through
    text = "".join(m.chunk.text for m in msgs[:-1])
    deadline = time.monotonic() + 10
    while True:  # the store runs after the answer; then the same request is a hit
        hit = stub.Complete(req, metadata=md(), timeout=60)
        if hit.route.cache_result == common_pb2.CACHE_RESULT_EXACT:
            break
        assert time.monotonic() < deadline, hit.route
        time.sleep(0.05)
    assert hit.text == text and hit.route.replica == ""  # router -> cache mTLS both ways
    assert worker.load().num_running == 0  # the worker's own port answers a cert holder


def test_health_ports_answer_in_plaintext_while_main_ports_require_tls(pki, worker, cache,
                                                                        router):
    for name, (main, health) in _targets(worker, cache, router).items():
        assert health_status(health) == "SERVING", name
        assert health_status(main, pki.client_tls()) == "SERVING", name  # one status
        err = refusal(main, None)  # plaintext to the TLS port
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err)


def test_health_port_shares_status_and_serves_nothing_else(pki, worker, cache):
    health = f"127.0.0.1:{cache.health_port}"
    cache._set_health(False)  # what stop() does first: probes must see it on both ports
    try:
        assert health_status(health) == "NOT_SERVING"
        assert health_status(f"127.0.0.1:{cache.port}", pki.client_tls()) == "NOT_SERVING"
    finally:
        cache._set_health(True)
    assert health_status(health) == "SERVING"
    # The plaintext port must not be a way around TLS to the service itself.
    with grpc.insecure_channel(f"127.0.0.1:{worker.settings['health_port']}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            worker_pb2_grpc.WorkerServiceStub(ch).GetLoad(worker_pb2.GetLoadRequest(),
                                                          timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("who", ["no certificate", "certificate of another CA",
                                 "trusts another CA"])
def test_mtls_servers_refuse_clients_without_the_right_certificate(pki, worker, cache, router,
                                                                   who):
    tls = {"no certificate": pki.client_tls(cert=False),
           "certificate of another CA": ClientTls(ca_file=pki.ca, cert_file=pki.other_client[0],
                                                  key_file=pki.other_client[1]),
           "trusts another CA": ClientTls(ca_file=pki.other_ca, cert_file=pki.client[0],
                                          key_file=pki.client[1])}[who]
    for name, (main, _) in _targets(worker, cache, router).items():
        assert refusal(main, tls).code() == grpc.StatusCode.UNAVAILABLE, name
    # And a real call, not only a health check, with a valid API key:
    with pytest.raises(grpc.RpcError) as info:
        _router_stub(router, tls).Complete(request("hello"), metadata=md(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _health_only(tls: ServerTls | None):
    """A server with only grpc.health.v1 (SERVING) on one port with `tls`."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", tls)
    server.start()
    return server, f"127.0.0.1:{port}"


def test_one_way_tls_and_server_name_override(pki):
    """TLS without mTLS lets clients without certificates in; a certificate that names a DNS
    host only is accepted from an IP address when the client overrides the server name."""
    one_way, target = _health_only(pki.server_tls(mutual=False))
    named, named_target = _health_only(ServerTls(cert_file=pki.named[0], key_file=pki.named[1]))
    try:
        assert health_status(target, ClientTls(ca_file=pki.ca)) == "SERVING"
        assert refusal(named_target, ClientTls(ca_file=pki.ca)).code() == \
            grpc.StatusCode.UNAVAILABLE  # 127.0.0.1 is not in its certificate
        assert health_status(named_target, ClientTls(ca_file=pki.ca,
                                                     server_name=NAMED_HOST)) == "SERVING"
    finally:
        one_way.stop(None)
        named.stop(None)


def test_settings_are_checked_with_their_names(pki, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    cert, key = pki.server
    cases = [
        (ServerTls(cert_file=str(tmp_path / "missing.crt"), key_file=key),
         "tls.cert_file: no such file"),
        (ServerTls(cert_file=cert, key_file=pki.client[1]), "are not a certificate and its key"),
        (ServerTls(cert_file=str(junk), key_file=key), "tls.cert_file: .* is not a PEM file"),
        (ServerTls(cert_file=cert, key_file=key, ca_file=str(junk), require_client_cert=True),
         "tls.ca_file: "),
    ]
    for tls, message in cases:
        with pytest.raises(TlsError, match=message):
            server_credentials(tls)
    with pytest.raises(TlsError, match=r"tls\.workers\.ca_file: no such file"):
        channel_credentials(ClientTls(ca_file=str(tmp_path / "nope")), "tls.workers.")
    with pytest.raises(ValueError, match="require_client_cert: true needs ca_file"):
        ServerTls(cert_file=cert, key_file=key, require_client_cert=True)
    with pytest.raises(ValueError, match="ca_file: only used to verify client"):
        ServerTls(cert_file=cert, key_file=key, ca_file=pki.ca)  # looks like mTLS, is not
    with pytest.raises(ValueError, match="cert_file and key_file: set both"):
        ClientTls(ca_file=pki.ca, cert_file=cert)
    base = {"tiers": {"small": {"replicas": ["127.0.0.1:1"]}},
            "tenants": {"t": {"api_keys": ["sk-t-00000001"]}}}
    for tls, message in [({"server": {"cert_file": cert}}, "tls.server.key_file: required"),
                         ({"workers": {"ca": pki.ca}}, r"tls.workers: unknown key\(s\) \['ca'\]"),
                         ({"health_port": 50051}, "tls.health_port: must differ from grpc_port")]:
        with pytest.raises(ConfigError, match=message):
            RouterConfig.from_dict({**base, "tls": tls})

    # The cluster config (`switchyard up`, the manifests) does not wire TLS yet: it refuses
    # the settings instead of starting services its probes and clients cannot reach.
    cluster = {"tiers": {"small": {"model": "smollm2", "port": 50061}},
               "tenants": {"t": {"api_keys": ["sk-t-00000001"]}}}
    for extra, message in [({"worker_defaults": {"tls": {}}}, r"unknown key\(s\) \['tls'\]"),
                           ({"router": {"settings": {"tls": {}}}}, "TLS is not part of"),
                           ({"cache": {"settings": {"health_port": 1}}}, "TLS is not part of")]:
        with pytest.raises(ClusterConfigError, match=message):
            ClusterConfig.from_dict({**cluster, **extra})


def test_worker_with_a_missing_certificate_exits_naming_it(tmp_path, tiny_models):
    proc = subprocess.run(
        [sys.executable, "-m", "services.worker", "--model", str(tiny_models[0]), "--port", "0",
         "--tls-cert-file", str(tmp_path / "absent.crt"), "--tls-key-file",
         str(tmp_path / "absent.key")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"tls.cert_file: no such file '{tmp_path / 'absent.crt'}'" in proc.stderr
    assert "listening on" not in proc.stdout  # nothing bound, no model loaded
