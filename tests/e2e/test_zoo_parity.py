"""Every reference-zoo model through the INT8 pipeline: quantize (preset int8) → export ONNX Q/DQ → parity.

Parity (``lowbit.export.runtime.parity``): ONNX Runtime running the exported INT8 file and lowbit's PyTorch
simulation agree within one output quantization step on at least 99.9% of output elements, on evaluation inputs
the calibration never saw.

The xfail marks record what still fails after the torch.export capture and engine-aware placement (2026-12-04);
they are not strict, so a model that starts passing shows up as XPASS: remove its mark then.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import zoo
from lowbit.export.runtime import PARITY_FRACTION

pytestmark = pytest.mark.slow

N_CALIB, CALIB_BATCH, N_EVAL = 8, 4, 4

_ULP = ("float LayerNorm / GELU / Softmax between quantizers round differently in torch and ONNX Runtime in the "
        "last ulp, and a few activation codes flip at the next quantizer")
KNOWN_FAILURES = {
    "mobilevit-xxs": f"{_ULP}; 92.6% within one step on 4 inputs after 32 calibration samples (passes on these 4)",
    "vit-tiny": f"{_ULP}; 99.30% within one step here (100% on the bench's 32 inputs)",
    "swin-tiny": f"{_ULP}; 99.85% within one step here (99.91% on the bench's 32 inputs)",
    "gpt2-small": f"{_ULP}; 99.70% within one step here (99.85% on the bench's 32 inputs)",
}


def _params():
    for name in zoo.REFERENCE_ZOO:
        marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=False)] if name in KNOWN_FAILURES else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_quantize_export_parity(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    entry = zoo.load_model(name)
    data = zoo.load_data(entry.default_data, n_calib=N_CALIB, n_eval=N_EVAL)
    recipe = lowbit.preset("int8").keep_float("type:LSTM", "type:GRU")  # no static INT8 LSTM kernel in ORT
    qmodel = lowbit.quantize(entry.model, list(data.calib.split(CALIB_BATCH)), recipe,
                             entry.example_input, show_progress=False)
    path = lowbit.export_onnx(qmodel, entry.example_input, tmp_path / "model_int8.onnx", check_parity=False)
    result = lowbit.check_onnx_parity(qmodel, path, data.eval_inputs)
    assert result.ok, (f"{name}: {100 * result.fraction_within_step:.2f}% of {result.elements} output elements "
                       f"within one step {result.step:.3g} (need {100 * PARITY_FRACTION:.1f}%), "
                       f"max |diff| {result.max_abs_diff:.3g}")
