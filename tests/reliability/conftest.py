"""Fixtures of the reliability tests: the router tests' real cluster (workers as processes,
the cache service on a private Redis, routers on a loop thread), shared, not copied; and the
routers the hostile-input modules call, one per module."""

import pytest

from tests.reliability import hostile, hostile_grpc, hostile_http
from tests.router.conftest import (  # noqa: F401 (fixtures)
    cache_target,
    classifier,
    cluster,
    make_router,
    redis_url,
    router,
    tiny_models,
)
from tests.worker.conftest import smollm2_gguf_reader, smollm2_tokenizer  # noqa: F401


@pytest.fixture(scope="module", autouse=True)
def _hostile_tally(request):
    """A module with a TALLY (the hostile-input ones) starts it from zero and prints it at its
    end, for the resolving note."""
    tally = getattr(request.module, "TALLY", None)
    if tally is not None:
        tally.reset()
    yield
    if tally is not None:
        hostile.report(request, tally)


@pytest.fixture(scope="module")
def grpc_router(cluster, make_router, cache_target):  # noqa: F811
    """The hostile gRPC modules' router (tenants acme, smallonly, limited)."""
    return hostile_grpc.start_router(cluster, make_router, cache_target)


@pytest.fixture(scope="module")
def api(cluster, make_router, cache_target):  # noqa: F811
    """The hostile HTTP modules' router (1 MiB body limit, a permission scope of its own)."""
    return hostile_http.start_api(cluster, make_router, cache_target)
