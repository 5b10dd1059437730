"""Fixtures of the reliability tests: the router tests' real cluster (workers as processes,
the cache service on a private Redis, routers on a loop thread), shared, not copied."""

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
