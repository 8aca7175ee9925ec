"""The whole pipeline on CUDA, on digits-cnn and EfficientNet-Lite0: PTQ, GPTQ, AdaRound, bias correction,
analysis, two QAT epochs, export + parity from a CUDA-resident model, the CLI with ``--device cuda``, and
min-max qparams bit-identical between CPU and CUDA. Skipped without CUDA (conftest)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import lowbit
from lowbit import qat
from lowbit.analysis import metrics
from lowbit.device import states_off_device
from lowbit.observers import make_observer
from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.transforms.prepare import quant_layers, quantizers
from lowbit.transforms.recipe import load_recipe

MODELS = ["digits-cnn", "efficientnet-lite0"]
CUDA = torch.device(os.environ.get("LOWBIT_GPU_SUITE_DEVICE", "cuda"))  # conftest: a dry run on cpu checks the tests


def _recipe(calibrator: str = "minmax", passes: tuple[str, ...] = ()):
    recipe = load_recipe("int8").with_calibrator(calibrator)
    return recipe.with_passes(*passes) if passes else recipe


def _quality(q, eval_x, eval_y, ref) -> float:
    with torch.no_grad():
        out = torch.cat([q(x.to(CUDA)).cpu() for x in eval_x.split(32)])
    return metrics.accuracy(out, eval_y) if eval_y is not None else metrics.top1_agreement(ref, out)


def _reference(model, eval_x):
    with torch.no_grad():
        return torch.cat([model(x) for x in eval_x.split(32)])


@pytest.mark.parametrize("name", MODELS)
def test_minmax_qparams_bit_identical_cpu_and_cuda(zoo_pair, name):
    model, example, calib, _, _ = zoo_pair(name)
    cpu = lowbit.quantize(model, calib, _recipe(), example, show_progress=False, device="cpu")
    gpu = lowbit.quantize(model, calib, _recipe(), example, show_progress=False, device=CUDA)
    assert states_off_device(gpu, CUDA) == [] and states_off_device(model, torch.device("cpu")) == []
    pairs = list(zip(quantizers(cpu), quantizers(gpu)))
    weights = {id(layer.weight_quantizer) for _, layer in quant_layers(cpu)}
    assert len(pairs) > 10
    for (name_c, a), (_, b) in pairs:
        if a.spec is None:
            continue
        if id(a) in weights:  # depends on the weights only: exactly the same arithmetic
            assert torch.equal(a.scale, b.scale.cpu()) and torch.equal(a.zero_point, b.zero_point.cpu()), name_c
        else:  # activations: the same min/max up to the order of float reductions in the convolutions
            torch.testing.assert_close(b.scale.cpu(), a.scale, rtol=1e-5, atol=0)


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "mse", "entropy", "meanstd", "ema"])
def test_observers_identical_on_identical_tensors(calibrator):
    torch.manual_seed(0)
    batches = [torch.randn(64, 16, 8, 8) * (i + 1) for i in range(4)]
    for granularity in (PerTensor(), PerChannel(1)):
        spec = QuantSpec(bits=8, signed=True, symmetric=False, granularity=granularity, calibrator=calibrator)
        try:
            cpu, gpu = make_observer(calibrator, granularity=granularity), make_observer(calibrator, granularity=granularity)
        except ValueError:
            continue  # this calibrator does not collect this granularity
        for x in batches:
            cpu.update(x)
            gpu.update(x.to(CUDA))
        (s_c, z_c), (s_g, z_g) = cpu.compute_qparams(spec), gpu.compute_qparams(spec)
        assert s_g.device.type == CUDA.type
        if calibrator in ("minmax", "percentile", "mse", "entropy"):  # exact statistics (extrema, integer counts)
            assert torch.equal(s_c, s_g.cpu()) and torch.equal(z_c, z_g.cpu())
        else:
            torch.testing.assert_close(s_g.cpu(), s_c, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("passes", [(), ("gptq", "bias_correction"), ("adaround", "bias_correction")])
def test_ptq_passes_on_cuda(zoo_pair, name, passes):
    model, example, calib, eval_x, eval_y = zoo_pair(name)
    ref = _reference(model, eval_x)
    q = lowbit.quantize(model, calib, _recipe("percentile", passes), example, show_progress=False, device=CUDA,
                        pass_batches=2)
    assert states_off_device(q, CUDA) == []
    floor = 0.9 if eval_y is not None else 0.75
    assert _quality(q, eval_x, eval_y, ref) >= floor


@pytest.mark.parametrize("name", MODELS)
def test_export_and_parity_from_a_cuda_model(zoo_pair, name, tmp_path):
    """Issue 15, nn/onnx_ops.py:67: exporting a CUDA-resident model failed on CPU bias qparams."""
    from lowbit.export.onnx_static import check_onnx_parity, export_onnx

    model, example, calib, eval_x, _ = zoo_pair(name)
    q = lowbit.quantize(model, calib, _recipe(), example, show_progress=False, device=CUDA)
    before = copy.deepcopy(q.state_dict())
    path = export_onnx(q, example, tmp_path / "m.onnx")
    assert states_off_device(q, CUDA) == []  # the user's model stays on the GPU, unchanged
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert check_onnx_parity(q, path, eval_x[:16]).ok


@pytest.mark.parametrize("name", MODELS)
def test_analyze_on_cuda_matches_cpu(zoo_pair, name):
    from lowbit.analysis import analyze

    model, example, calib, _, _ = zoo_pair(name)
    data = calib[:16]
    cpu = analyze(model, data, _recipe(), example, budget_seconds=0, batch_size=8, device="cpu")
    gpu = analyze(model, data, _recipe(), example, budget_seconds=0, batch_size=8, device=CUDA)
    assert [r["layer"] for r in gpu.rows] == [r["layer"] for r in cpu.rows]
    for a, b in zip(cpu.rows, gpu.rows):
        if a["sqnr_db_isolated"] not in (None, float("inf")):
            assert abs(a["sqnr_db_isolated"] - b["sqnr_db_isolated"]) < 0.5, a["layer"]


@pytest.mark.parametrize("name", MODELS)
def test_qat_two_epochs_on_cuda(zoo_pair, name, tmp_path):
    """Issue 15, core/ste.py:40: QAT failed at its first step with the LSQ scale on the CPU."""
    from lowbit.qat.train import TrainConfig, train_qat

    model, example, calib, eval_x, eval_y = zoo_pair(name)
    teacher = copy.deepcopy(model).to(CUDA)
    prepared = qat.prepare_qat_(copy.deepcopy(model).to(CUDA), _recipe(), example, from_ptq=True, calib_data=calib)
    assert states_off_device(prepared, CUDA) == []
    state = train_qat(prepared, calib, None, teacher, TrainConfig(epochs=2, batch_size=16, lr=1e-5, distill="kl"))
    assert len(state.log) == 2 and all(torch.isfinite(torch.tensor(e.loss)) for e in state.log)
    converted = qat.convert_(prepared)
    assert states_off_device(converted, CUDA) == []
    from lowbit.export.onnx_static import check_onnx_parity, export_onnx

    path = export_onnx(converted, example, tmp_path / "qat.onnx", check_parity=False)
    assert check_onnx_parity(converted, path, eval_x[:16]).ok


def test_cli_quantize_and_qat_with_device_cuda(tmp_path):
    from lowbit.cli.main import main

    out = tmp_path / "q"
    assert main(["quantize", "--model", "digits-cnn", "--data", "digits", "--device", str(CUDA), "--passes",
                 "gptq,bias_correction", "--out", str(out), "--repeats", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity_ok"] and report["metric_int8"] >= 0.9
    out = tmp_path / "qat"
    assert main(["qat", "--model", "digits-cnn", "--data", "digits", "--device", "auto" if CUDA.type == "cuda" else "cpu", "--epochs", "2",
                 "--out", str(out), "--repeats", "1"]) == 0
    assert json.loads((out / "report.json").read_text())["parity_ok"]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_qat_ddp_nccl_two_gpus(tmp_path):
    from lowbit.cli.main import main

    out = tmp_path / "ddp"
    assert main(["qat", "--model", "digits-cnn", "--data", "digits", "--device", str(CUDA), "--nproc", "2",
                 "--epochs", "1", "--out", str(out), "--repeats", "1"]) == 0
    assert json.loads((out / "report.json").read_text())["training"]["nproc"] == 2


def test_cli_streams_a_npy_to_the_gpu_with_workers(tmp_path):
    """A memory-mapped .npy read by 2 DataLoader workers (pinned memory) into a CUDA model: the same qparams as
    the same inputs in memory."""
    import numpy as np

    from lowbit.cli.main import main
    from lowbit.zoo import load_data

    x = load_data("digits").calib
    np.save(tmp_path / "calib.npy", x.numpy())
    out = tmp_path / "npy"
    assert main(["quantize", "--model", "digits-cnn", "--data", str(tmp_path / "calib.npy"), "--device", str(CUDA),
                 "--workers", "2", "--calibrator", "minmax", "--out", str(out), "--repeats", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity_ok"] and report["eval_samples"] == len(x)
