"""The gRPC contracts: checked-in stubs match their .proto sources, and the protos follow the
house rules (versioned packages, UNSPECIFIED enum zeros, a comment on everything)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"


def _load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO_ROOT / "scripts/gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_protos = _load_gen_protos()

MODULES = {
    "switchyard.common.v1": common_pb2,
    "switchyard.worker.v1": worker_pb2,
    "switchyard.router.v1": router_pb2,
    "switchyard.cache.v1": cache_pb2,
}


@pytest.fixture(scope="module")
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    return gen_protos.descriptor_set(PROTO_ROOT)


# --- drift -----------------------------------------------------------------------------------


def test_checked_in_stubs_match_a_fresh_generation():
    problems = gen_protos.check(PROTO_ROOT)
    assert problems == [], "stubs drifted; run `.venv/bin/python scripts/gen_protos.py`:\n" + (
        "\n".join(problems)
    )


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda root: (root / "switchyard/worker/v1/worker_pb2.py").open("a").write("# drift\n"),
            ["differs: switchyard/worker/v1/worker_pb2.py"],
        ),
        (
            lambda root: (root / "switchyard/cache/v1/cache_pb2_grpc.py").unlink(),
            ["missing: switchyard/cache/v1/cache_pb2_grpc.py"],
        ),
        (
            lambda root: (root / "switchyard/router/v1/old_pb2.py").write_text(""),
            ["extra: switchyard/router/v1/old_pb2.py"],
        ),
    ],
    ids=["edited", "deleted", "stale"],
)
def test_drift_check_reports_the_changed_file(tmp_path, mutate, expected):
    copy = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert gen_protos.check(copy) == []
    mutate(copy)
    assert gen_protos.check(copy) == expected
    assert gen_protos.main(["--check", "--proto-root", str(copy)]) == 1


def test_write_repairs_drift(tmp_path):
    copy = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    stub = copy / "switchyard/common/v1/common_pb2.pyi"
    stub.write_text(stub.read_text() + "# drift\n")
    (copy / "switchyard/common/v1/common_pb2.py").unlink()
    assert gen_protos.write(copy) == [
        "missing: switchyard/common/v1/common_pb2.py",
        "differs: switchyard/common/v1/common_pb2.pyi",
    ]
    assert gen_protos.check(copy) == []


# --- packages and services -------------------------------------------------------------------


@pytest.mark.parametrize("package", sorted(MODULES))
def test_package_names(package):
    assert MODULES[package].DESCRIPTOR.package == package


def test_every_proto_has_a_known_versioned_package(descriptor_set):
    assert sorted(f.package for f in descriptor_set.file) == sorted(MODULES)
    for file in descriptor_set.file:
        assert file.syntax == "proto3", file.name
        # The path mirrors the package: switchyard/worker/v1/worker.proto.
        assert Path(file.name).parent.as_posix() == file.package.replace(".", "/")


# (service, rpc) -> (request type, response type, client streaming, server streaming)
EXPECTED_RPCS = {
    (worker_pb2, "WorkerService"): {
        "Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "Abort": ("AbortRequest", "AbortResponse", False, False),
        "GetLoad": ("GetLoadRequest", "Load", False, False),
        "WatchLoad": ("WatchLoadRequest", "Load", False, True),
    },
    (router_pb2, "RouterService"): {
        "Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "Complete": ("GenerateRequest", "CompleteResponse", False, False),
    },
    (cache_pb2, "CacheService"): {
        "Lookup": ("LookupRequest", "LookupResponse", False, False),
        "Store": ("StoreRequest", "StoreResponse", False, False),
        "Invalidate": ("InvalidateRequest", "InvalidateResponse", False, False),
        "Stats": ("StatsRequest", "StatsResponse", False, False),
    },
}


@pytest.mark.parametrize(("module", "service"), list(EXPECTED_RPCS), ids=lambda x: str(x))
def test_services_have_the_expected_rpcs(module, service):
    assert list(module.DESCRIPTOR.services_by_name) == [service]
    methods = module.DESCRIPTOR.services_by_name[service].methods_by_name
    actual = {
        name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for name, m in methods.items()
    }
    assert actual == EXPECTED_RPCS[(module, service)]
    for m in methods.values():
        assert m.input_type.file.package == module.DESCRIPTOR.package


def test_grpc_stubs_and_servicers_exist():
    for grpc_module, service in [
        (worker_pb2_grpc, "WorkerService"),
        (router_pb2_grpc, "RouterService"),
        (cache_pb2_grpc, "CacheService"),
    ]:
        assert hasattr(grpc_module, f"{service}Stub")
        assert hasattr(grpc_module, f"{service}Servicer")
        assert hasattr(grpc_module, f"add_{service}Servicer_to_server")


# --- enums -----------------------------------------------------------------------------------


def _upper_snake(camel: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", camel).upper()


def _all_enums():
    for module in MODULES.values():
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        yield from module.DESCRIPTOR.enum_types_by_name.values()
        while pending:
            message = pending.pop()
            yield from message.enum_types
            pending.extend(message.nested_types)


@pytest.mark.parametrize("enum", list(_all_enums()), ids=lambda e: e.full_name)
def test_enum_zero_is_unspecified_and_values_are_prefixed(enum):
    prefix = _upper_snake(enum.name)
    zero = enum.values_by_number[0]
    assert zero.name == f"{prefix}_UNSPECIFIED"
    for value in enum.values:
        assert value.name.startswith(prefix + "_"), value.name


def test_enum_walk_finds_every_enum():
    names = {e.full_name for e in _all_enums()}
    assert {
        "switchyard.common.v1.Tier",
        "switchyard.common.v1.Role",
        "switchyard.common.v1.FinishReason",
        "switchyard.common.v1.ErrorCode",
        "switchyard.common.v1.CacheResult",
        "switchyard.common.v1.CacheMode",
    } <= names


def test_error_codes_equal_grpc_status_numbers():
    codes = common_pb2.ErrorCode
    for name in codes.keys():
        if name == "ERROR_CODE_UNSPECIFIED":
            continue
        status = getattr(grpc.StatusCode, name.removeprefix("ERROR_CODE_"))
        assert codes.Value(name) == status.value[0], name


# --- comments --------------------------------------------------------------------------------

# Field numbers of the descriptor.proto fields that make up SourceCodeInfo paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE, SERVICE_METHOD = 2, 2


def _documentable(file: descriptor_pb2.FileDescriptorProto):
    """Yield (path, name) for every message, field, oneof, enum, enum value, service and rpc."""

    def enum(path, e, scope):
        yield path, f"{scope}{e.name}"
        for i, v in enumerate(e.value):
            yield (*path, ENUM_VALUE, i), f"{scope}{e.name}.{v.name}"

    def message(path, m, scope):
        name = f"{scope}{m.name}"
        if m.options.map_entry:  # synthesized for map<,> fields; has no source of its own
            return
        yield path, name
        for i, f in enumerate(m.field):
            yield (*path, MSG_FIELD, i), f"{name}.{f.name}"
        synthetic = {f.oneof_index for f in m.field if f.proto3_optional}
        for i, o in enumerate(m.oneof_decl):
            if i not in synthetic:  # proto3 `optional` makes a hidden oneof per field
                yield (*path, MSG_ONEOF, i), f"{name}.{o.name}"
        for i, nested in enumerate(m.nested_type):
            yield from message((*path, MSG_NESTED, i), nested, f"{name}.")
        for i, e in enumerate(m.enum_type):
            yield from enum((*path, MSG_ENUM, i), e, f"{name}.")

    for i, m in enumerate(file.message_type):
        yield from message((FILE_MESSAGE, i), m, "")
    for i, e in enumerate(file.enum_type):
        yield from enum((FILE_ENUM, i), e, "")
    for i, s in enumerate(file.service):
        yield (FILE_SERVICE, i), s.name
        for j, method in enumerate(s.method):
            yield (FILE_SERVICE, i, SERVICE_METHOD, j), f"{s.name}.{method.name}"


def test_everything_has_a_leading_comment(descriptor_set):
    undocumented = []
    checked = 0
    for file in descriptor_set.file:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
        }
        for path, name in _documentable(file):
            checked += 1
            if not comments.get(path):
                undocumented.append(f"{file.name}: {name}")
    assert checked > 200  # guards against a walk that silently visits nothing
    assert undocumented == [], "add a leading `//` comment to:\n" + "\n".join(undocumented)


def test_comment_check_catches_a_missing_comment(tmp_path):
    copy = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py*"))
    proto = copy / "switchyard/cache/v1/cache.proto"
    text = proto.read_text()
    commented = "  // Number of entries removed (0 if none matched).\n  uint64 removed = 1;"
    assert commented in text
    proto.write_text(text.replace(commented, "  uint64 removed = 1;"))
    files = gen_protos.descriptor_set(copy).file
    file = next(f for f in files if f.name == "switchyard/cache/v1/cache.proto")
    comments = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments}
    missing = [name for path, name in _documentable(file) if path not in comments]
    assert missing == ["InvalidateResponse.removed"]


# --- field conventions -----------------------------------------------------------------------


def test_sampling_scalars_distinguish_unset_from_zero():
    fields = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    optional = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "seed", "logprobs"}
    for name in optional:
        assert fields[name].has_presence, name
    params = common_pb2.SamplingParams(temperature=0.0)
    assert params.HasField("temperature") and not params.HasField("top_p")


def test_time_fields_are_double_milliseconds():
    for module in MODULES.values():
        for message in module.DESCRIPTOR.message_types_by_name.values():
            for field in message.fields:
                if field.name.endswith("_ms") and field.name != "interval_ms":
                    assert field.type == field.TYPE_DOUBLE, f"{message.full_name}.{field.name}"


def test_workers_receive_text_not_token_ids():
    inputs = worker_pb2.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert [f.name for f in inputs.fields] == ["prompt", "chat"]
    assert not any("token_id" in f.name for f in worker_pb2.GenerateRequest.DESCRIPTOR.fields)


def test_streaming_responses_round_trip():
    done = worker_pb2.GenerateResponse(
        complete=worker_pb2.Complete(
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3),
        )
    )
    parsed = worker_pb2.GenerateResponse.FromString(done.SerializeToString())
    assert parsed.WhichOneof("kind") == "complete"
    assert parsed.complete.usage.completion_tokens == 3
    final = router_pb2.GenerateResponse(final=router_pb2.Final(request_id="r1"))
    parsed = router_pb2.GenerateResponse.FromString(final.SerializeToString())
    assert parsed.final.request_id == "r1"
