"""lowbit: take a PyTorch model to INT8 and ship it — calibrate, quantize, export ONNX Q/DQ, report honestly.

Python API (prepare_ → calibrate → convert_ → export_onnx, or ``quantize`` for the first three on a copy):

>>> import torch, lowbit
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
>>> x = torch.randn(16, 4)
>>> qmodel = lowbit.prepare_(model, lowbit.preset("int8"), x[:1])   # BN folded, quantizers inserted
>>> _ = lowbit.calibrate(qmodel, x, show_progress=False)              # batches, one Tensor, or forward_loop
>>> _ = lowbit.convert_(qmodel)                                       # scales and zero-points frozen
>>> bool((qmodel(x) - model(x)).abs().max() < 0.1)
True
>>> sorted(lowbit.preset("int8-per-tensor").with_passes("bias_correction", "cle").passes)
['bias_correction', 'cle']

``lowbit.export_onnx(qmodel, x[:1], "model_int8.onnx")`` writes the ONNX Q/DQ model (parity checked on
ONNX Runtime); ``lowbit.quantize_to_dir(...)`` is the whole job the ``lowbit quantize`` command runs.
"""

from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.export.onnx_static import check_onnx_parity, export_onnx
from lowbit.export.trt_cache import write_trt_calibration_cache
from lowbit.analysis import AnalysisResult, analyze
from lowbit.jobs import __version__, quantize_to_dir
from lowbit.ptq.passes import quantize
from lowbit.ptq.calibrate import calibrate
from lowbit.transforms.prepare import convert_, prepare_
from lowbit.transforms.recipe import PRESETS, LayerRule, Recipe, load_recipe, preset

__all__ = [
    "AnalysisResult", "PRESETS", "LayerRule", "PerChannel", "PerGroup", "PerTensor", "QuantSpec", "Recipe", "__version__", "analyze", "calibrate", "check_onnx_parity",
    "convert_", "export_onnx", "load_recipe", "prepare_", "preset", "quantize", "quantize_to_dir",
    "write_trt_calibration_cache",
]
