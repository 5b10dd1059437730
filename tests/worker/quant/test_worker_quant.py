"""The quantized tier is the same worker with `--quantization`: the flag and config key parse,
and the load report and every final usage name the scheme."""

from __future__ import annotations

import pytest
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2

from services.worker.__main__ import parse_args
from services.worker.config import WorkerConfig

from ..test_worker_grpc import _collect, _req, running_worker


def test_flag_and_config_key(tmp_path):
    assert parse_args(["--model", "m", "--quantization", "int4"]).quantization == "int4"
    cfg = tmp_path / "w.yaml"
    cfg.write_text("model: m\nquantization: int8\ntier: quantized\n")
    assert parse_args(["--config", str(cfg)]).quantization == "int8"
    assert parse_args(["--model", "m"]).quantization == "none"
    with pytest.raises(ValueError, match="'int2'"):
        WorkerConfig(model="m", quantization="int2")


def test_load_and_usage_name_the_scheme(tiny_model_dir):
    with running_worker(tiny_model_dir, quantization="int4", tier="quantized") as (stub, *_):
        load = stub.GetLoad(worker_pb2.GetLoadRequest())
        assert load.quantization == common_pb2.QUANTIZATION_INT4
        assert load.tier == common_pb2.TIER_QUANTIZED
        chunks, final = _collect(stub.Generate(_req(max_tokens=4)))
        assert final.complete.usage.quantization == common_pb2.QUANTIZATION_INT4
        assert final.complete.usage.completion_tokens == 4


def test_float_worker_reports_none(tiny_model_dir):
    with running_worker(tiny_model_dir) as (stub, *_):
        assert stub.GetLoad(worker_pb2.GetLoadRequest()).quantization == \
            common_pb2.QUANTIZATION_NONE
