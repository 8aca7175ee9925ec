"""TensorRT accepts the tensorrt-int8 export (explicit quantization). Runs only where TensorRT and a CUDA
GPU exist; skipped cleanly elsewhere (CI has no GPU)."""

from __future__ import annotations

import pytest
import torch

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU-only path)")
if not torch.cuda.is_available():  # pragma: no cover - depends on the machine
    pytest.skip("no CUDA GPU: TensorRT engine build skipped", allow_module_level=True)

import lowbit  # noqa: E402
from lowbit.zoo import load_data, load_model  # noqa: E402


def test_tensorrt_parses_and_builds_int8_engine(tmp_path):
    zm, data = load_model("digits-cnn"), load_data("digits")
    qmodel = lowbit.quantize(zm.model, data.calib, lowbit.preset("tensorrt-int8"), zm.example_input, show_progress=False)
    path = lowbit.export_onnx(qmodel, zm.example_input, tmp_path / "m.onnx", target="tensorrt", check_parity=False)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(path.read_bytes())
    assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0
