"""The worker's protobuf edge: requests to domain values, engine events to responses."""

from __future__ import annotations

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2

from services.worker.engine.errors import InvalidArgument
from services.worker.engine.output_processor import Completion, StreamEvent
from services.worker.engine.request import RequestStatus
from services.worker.engine.sampling_params import SamplingParams
from services.worker.tokenizer import Tokenizer

ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: common_pb2.FINISH_REASON_STOP,
    RequestStatus.FINISHED_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    RequestStatus.FINISHED_ABORTED: common_pb2.FINISH_REASON_ABORT,
}
QUANTIZATIONS = {
    "none": common_pb2.QUANTIZATION_NONE,
    "int8": common_pb2.QUANTIZATION_INT8,
    "int4": common_pb2.QUANTIZATION_INT4,
}
MAX_LABELS = 32
MAX_LABEL_BYTES = 256


def reject_unknown_fields(msg: Message, path: str = "") -> None:
    """Fields this worker does not know mean a newer client expects behaviour we lack."""
    unknown = UnknownFieldSet(msg)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        raise InvalidArgument(path or "request", f"unknown field numbers {numbers}")
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        items = value if fd.is_repeated else [value]
        for item in items:
            reject_unknown_fields(item, name)


def sampling_params(req: worker_pb2.GenerateRequest) -> SamplingParams:
    """Proto SamplingParams + max_tokens -> domain params (validated; raises InvalidArgument)."""
    s = req.sampling
    kwargs: dict = {"max_tokens": req.max_tokens}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if s.HasField(name):
            kwargs[name] = getattr(s, name)
    if s.HasField("top_k"):
        if s.top_k == 0:
            raise InvalidArgument("sampling.top_k", "must be >= 1 when set (unset turns it off)")
        kwargs["top_k"] = s.top_k
    if s.HasField("seed"):
        kwargs["seed"] = s.seed
    if s.HasField("logprobs"):
        kwargs["logprobs"] = s.logprobs
    kwargs["stop"] = tuple(s.stop)
    kwargs["stop_token_ids"] = tuple(s.stop_token_ids)
    kwargs["ignore_eos"] = s.ignore_eos
    try:
        return SamplingParams(**kwargs)
    except InvalidArgument as exc:
        prefix = "" if exc.field == "max_tokens" else "sampling."
        raise InvalidArgument(prefix + exc.field, exc.message) from None


def prompt_text(req: worker_pb2.GenerateRequest, tokenizer: Tokenizer) -> str:
    """The text to tokenize: the raw prompt, or the chat rendered with the model's template."""
    which = req.WhichOneof("input")
    if which == "prompt":
        if not req.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        return req.prompt
    if which == "chat":
        if not req.chat.messages:
            raise InvalidArgument("chat.messages", "must hold at least one message")
        messages = []
        for i, m in enumerate(req.chat.messages):
            if m.role not in ROLES:
                raise InvalidArgument(f"chat.messages[{i}].role", "must be set to a known role")
            messages.append({"role": ROLES[m.role], "content": m.content})
        add_prompt = req.add_generation_prompt if req.HasField("add_generation_prompt") else True
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt)
        except ValueError as exc:
            raise InvalidArgument("chat", str(exc)) from None
    raise InvalidArgument("input", "one of prompt or chat is required")


def validate_request(req: worker_pb2.GenerateRequest) -> None:
    reject_unknown_fields(req)
    if not req.request_id:
        raise InvalidArgument("request_id", "is required")
    if len(req.labels) > MAX_LABELS or any(
            len(k) + len(v) > MAX_LABEL_BYTES for k, v in req.labels.items()):
        raise InvalidArgument("labels", f"at most {MAX_LABELS} labels of {MAX_LABEL_BYTES} bytes")


def chunk(event: StreamEvent, tokenizer: Tokenizer) -> worker_pb2.GenerateResponse:
    msg = worker_pb2.Chunk(text=event.text, token_ids=event.token_ids)
    for lp in event.logprobs:
        entry = msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
        for tid, val in lp.top:
            entry.top.add(token_id=tid, logprob=val, text=tokenizer.decode([tid]))
    return worker_pb2.GenerateResponse(chunk=msg)


def complete(c: Completion, model_id: str,
             quantization: str = "none") -> worker_pb2.GenerateResponse:
    """The stream's final message; `quantization` is the serving model's scheme name."""
    stop = "" if c.stop_reason is None else str(c.stop_reason)
    return worker_pb2.GenerateResponse(complete=worker_pb2.Complete(
        finish_reason=FINISH_REASONS[c.status],
        stop_reason=stop if c.status is RequestStatus.FINISHED_STOPPED else "",
        usage=common_pb2.Usage(prompt_tokens=c.prompt_tokens,
                               completion_tokens=c.completion_tokens,
                               cached_prompt_tokens=c.cached_prompt_tokens,
                               quantization=QUANTIZATIONS[quantization]),
        timings=common_pb2.Timings(queue_ms=c.timings.queue_ms, ttft_ms=c.timings.ttft_ms,
                                   decode_ms=c.timings.decode_ms, total_ms=c.timings.total_ms),
        model_id=model_id,
    ))
