"""Status messages are cut to fit in HTTP/2 trailers; stream handlers close when the RPC ends."""

import asyncio

from services.common.grpc_errors import MAX_DETAILS_CHARS, _details, maps_errors


def test_long_details_are_cut_and_say_so():
    assert _details("prompt: must not be empty") == "prompt: must not be empty"
    long = "x" * (MAX_DETAILS_CHARS + 500)
    cut = _details(long)
    assert cut.startswith("x" * MAX_DETAILS_CHARS) and cut.endswith("(500 more chars)")
    assert len(cut) < MAX_DETAILS_CHARS + 40


class _Context:
    """The part of grpc.aio.ServicerContext the wrapper uses: RPC-termination callbacks."""

    def __init__(self):
        self.callbacks = []

    def add_done_callback(self, cb):
        self.callbacks.append(cb)

    def end_rpc(self):
        for cb in self.callbacks:
            cb(self)


def test_a_handler_left_at_its_yield_is_closed_when_the_rpc_ends():
    """grpc aio abandons a stream handler at its yield when the RPC ends during a write; its
    cleanup (aborting engine work) must run then, not when the garbage collector finds it."""
    cleaned = []

    class Servicer:
        @maps_errors
        async def Generate(self, request, context):
            try:
                for i in range(100):
                    yield i
            finally:
                cleaned.append(request)

    async def scenario():
        ctx = _Context()
        stream = Servicer().Generate("req-1", ctx)
        assert await anext(stream) == 0  # one message written, then the client goes away
        ctx.end_rpc()  # the stream is never resumed nor closed by its consumer
        for _ in range(3):
            await asyncio.sleep(0)
        assert cleaned == ["req-1"]
        finished = Servicer().Generate("req-2", _Context())
        assert [x async for x in finished] == list(range(100))
        assert cleaned == ["req-1", "req-2"]
        return stream  # kept referenced to the end: garbage collection cannot be what closed it

    asyncio.run(scenario())
