"""Status messages are cut to fit in HTTP/2 trailers."""

from services.common.grpc_errors import MAX_DETAILS_CHARS, _details


def test_long_details_are_cut_and_say_so():
    assert _details("prompt: must not be empty") == "prompt: must not be empty"
    long = "x" * (MAX_DETAILS_CHARS + 500)
    cut = _details(long)
    assert cut.startswith("x" * MAX_DETAILS_CHARS) and cut.endswith("(500 more chars)")
    assert len(cut) < MAX_DETAILS_CHARS + 40
