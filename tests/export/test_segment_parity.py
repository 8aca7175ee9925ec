"""export.segment_parity: each quantized tensor of the simulation against ONNX Runtime's codes under teacher
forcing; a wrong scale in the file is found and named; the probe outputs keep ONNX Runtime's fusions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.export.runtime import INT8_KERNELS, optimized_op_types
from lowbit.export.segment_parity import activation_q_outputs, parity_with_segments, segment_parity


class ConvNormNet(nn.Module):
    """Integer convs, then float LayerNorm / GELU between two quantized Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(torch.flatten(x, 1)))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 16, 16)
    q = lowbit.quantize(ConvNormNet().eval(), list(calib.split(8)), lowbit.preset("int8"), calib[:1],
                        show_progress=False)
    path = lowbit.export_onnx(q, calib[:1], tmp_path_factory.mktemp("seg") / "m.onnx", check_parity=False)
    return q, path, torch.randn(6, 3, 16, 16)


def test_every_quantized_tensor_matches_the_engine(exported):
    q, path, x = exported
    result = segment_parity(q, path, x)
    assert result is not None and result.ok, result
    assert result.tensors >= 4 and result.missing == []
    assert result.max_code_diff <= 1 and result.min_fraction_equal >= 0.999
    assert result.output_fraction_within_step == 1.0


def test_constants_are_not_probed(exported):
    _, path, _ = exported
    proto = onnx.load(str(path))
    found = activation_q_outputs(proto)
    inits = {i.name for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for tensor in found.values():
        assert producers[tensor].op_type == "QuantizeLinear" and producers[tensor].input[0] not in inits


def test_probe_outputs_keep_the_integer_kernels(exported, tmp_path):
    _, path, _ = exported
    proto = onnx.load(str(path))
    for tensor in activation_q_outputs(proto).values():
        proto.graph.output.append(onnx.ValueInfoProto(name=tensor))
    probe = tmp_path / "probe.onnx"
    onnx.save(proto, str(probe))
    kernels = lambda p: {k: v for k, v in optimized_op_types(p).items() if k in INT8_KERNELS}  # noqa: E731
    assert kernels(probe) == kernels(path) and kernels(path).get("QLinearConv") == 2


def test_a_wrong_scale_in_the_file_is_found_and_named(exported, tmp_path):
    q, path, x = exported
    proto = onnx.load(str(path))
    scope = next(k for k in activation_q_outputs(proto) if k.startswith("c2"))  # the input of conv c2
    node = next(n for n in proto.graph.node if n.name == f"/{scope}/QuantizeLinear")
    scale_name = node.input[1]
    for init in proto.graph.initializer:
        if init.name == scale_name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), scale_name))
    for n in proto.graph.node:  # a scale may also be a Constant node
        if n.op_type == "Constant" and n.output[0] == scale_name:
            value = numpy_helper.to_array(n.attribute[0].t) * np.float32(1.5)
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), scale_name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    result = segment_parity(q, bad, x)
    assert not result.ok
    assert result.worst == scope or any(scope == name for name, _ in result.differing)


def test_output_level_pass_needs_no_segment_check(exported):
    q, path, x = exported
    from lowbit.export.runtime import make_session, run_session

    engine = run_session(make_session(path), x)
    with torch.no_grad():
        sim = q(x)
    result = parity_with_segments(q, path, x, sim, engine)
    assert result.ok and result.segment is None
    shifted = parity_with_segments(q, path, x, sim + 10.0, engine)  # a gross output error: segments decide
    assert shifted.segment is not None and shifted.ok == shifted.segment["ok"]
