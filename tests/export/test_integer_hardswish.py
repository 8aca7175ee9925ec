"""Hardswish on ONNX Runtime integer kernels: x · hardsigmoid(x) with hardsigmoid as QLinearAdd(x, 3) into a
saturating Q read back at s/6 (``nn.QuantHardSigmoid``); bit-exact parity, no float activation left."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.analysis.metrics import sqnr_db
from lowbit.export.runtime import make_session, optimized_op_types, run_session
from lowbit.nn.functional import QuantHardSigmoid


class MobileNetV3Block(nn.Module):
    """Hardswish convs and a squeeze-excite gate ``x · hardsigmoid(conv(pool(x)))``, then a Conv reading a
    Hardsigmoid directly (that one stays float: a Conv would read the gate codes at the wrong scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.se, self.c3, self.c4 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = F.hardswish(self.c2(F.hardswish(self.c1(x))))
        x = x * F.hardsigmoid(self.se(F.adaptive_avg_pool2d(x, 1)))
        return self.c4(F.hardsigmoid(self.c3(x)))


def _net() -> nn.Module:
    return MobileNetV3Block().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = _net()
    calib = torch.randn(32, 3, 16, 16) * 2
    q = lowbit.quantize(model, list(calib.split(8)), lowbit.preset("int8"), calib[:1], show_progress=False)
    tmp = tmp_path_factory.mktemp("hswish")
    int8 = lowbit.export_onnx(q, calib[:1], tmp / "int8.onnx", check_parity=False)
    fp32 = lowbit.export_onnx(q, calib[:1], tmp / "fp32.onnx", float_model=True)
    return model, q, int8, fp32


def test_every_activation_runs_on_integer_kernels(exported):
    _, q, int8, _ = exported
    assert sum(isinstance(m, QuantHardSigmoid) for m in q.modules()) == 3
    ops = optimized_op_types(int8)
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 3 and ops["QLinearMul"] == 3
    assert not {"HardSwish", "Mul", "Add", "Clip", "Div"} & set(ops)
    assert ops.get("HardSigmoid", 0) <= 1  # the one read by a Conv (possibly fused into it by ORT)


def test_the_float_file_keeps_the_original_op(exported):
    import onnx

    _, _, _, fp32 = exported
    ops = {n.op_type for n in onnx.load(str(fp32)).graph.node}
    assert "HardSigmoid" in ops and not {"Clip", "Div", "QuantizeLinear"} & ops


def test_simulation_matches_onnx_runtime_bit_for_bit(exported):
    model, q, int8, _ = exported
    x = torch.randn(16, 3, 16, 16) * 2
    engine = run_session(make_session(int8), x)
    with torch.no_grad():
        sim, ref = q(x), model(x)
    par = lowbit.check_onnx_parity(q, int8, x)
    assert par.ok and par.segment is None
    assert par.fraction_within_step == 1.0 and par.max_abs_diff <= par.step
    assert sqnr_db(ref, sim) > 30.0 and sqnr_db(ref, engine) > 30.0


def test_hardsigmoid_codes_saturate_where_relu6_clips():
    from lowbit.core import QuantSpec
    from lowbit.nn import TensorQuantizer

    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    q_x, q_r = TensorQuantizer(spec, "x"), TensorQuantizer(spec, "r")
    x = torch.linspace(-8, 8, 4001)
    for q, t in ((q_x, x), (q_r, torch.clamp(x + 3, 0, 6))):
        q.start_calibration()
        q(t)
        q.freeze()
    mod = QuantHardSigmoid("hs")
    mod.set_engine_quantizers(q_x, q_r)
    with torch.no_grad():
        out = mod(q_x(x))
    step = float(q_r.scale) / 6
    assert (out - F.hardsigmoid(q_x(x))).abs().max() <= step * 0.5 + 1e-6  # one rounding of relu6(x + 3)
    assert float(out.min()) == 0.0 and abs(float(out.max()) - 1.0) <= step
