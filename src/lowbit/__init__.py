"""lowbit: take a PyTorch model to INT8 and ship it — calibrate, quantize, export ONNX Q/DQ, report honestly.

Python API::

    import lowbit
    recipe = lowbit.preset("int8")
    qmodel = lowbit.prepare_(model.eval(), recipe, example_input)
    lowbit.calibrate(qmodel, calibration_batches)
    lowbit.convert_(qmodel)
    lowbit.export_onnx(qmodel, example_input, "model_int8.onnx")
"""

from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.export.onnx_export import check_onnx_parity, export_onnx
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
