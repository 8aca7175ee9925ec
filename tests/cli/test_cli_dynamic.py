"""lowbit quantize --mode dynamic (in-process) on minilm-l6 / sentences: files, embedding report, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.analysis.embedding_metrics import mean_cosine, nn_agreement
from lowbit.cli.main import main
from lowbit.core import PerChannel
from lowbit.export.onnx_dynamic import run_onnx
from lowbit.export.runtime import make_session

FILES = ["model_fp32.onnx", "model_int8.onnx", "recipe.yaml", "report.json", "report.md"]


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "minilm-dynamic"
    rc = main(["quantize", "--mode", "dynamic", "--model", "minilm-l6", "--data", "sentences", "--n-calib", "1",
               "--n-eval", "12", "--repeats", "1", "--out", str(out)])
    return rc, out


def test_dynamic_minilm_writes_the_files_and_an_embedding_report(minilm_run):
    rc, out = minilm_run
    assert rc == 0 and sorted(os.listdir(out)) == FILES
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dynamic" and report["eval_samples"] == 12
    assert report["metric_name"] == "mean cosine similarity to FP32"
    assert report["metric_int8"] > 0.98 and report["nn_agreement"] >= 0.75
    assert report["executed_op_types"].get("DynamicQuantizeMatMul", 0) + report["executed_op_types"].get("MatMulIntegerToFloat", 0) == 36
    assert report["size_bytes_int8"] < 0.7 * report["size_bytes_fp32"]
    recipe = lowbit.load_recipe(out / "recipe.yaml")
    assert isinstance(recipe.default_input.granularity, PerChannel)  # per-token run-time activations
    assert "| metric (mean cosine similarity to FP32) |" in (out / "report.md").read_text()


def test_the_report_figures_come_from_onnx_runtime(minilm_run):
    _, out = minilm_run
    report = json.loads((out / "report.json").read_text())
    ids = lowbit.zoo.load_data("sentences", n_calib=1, n_eval=12).eval_inputs
    ref = run_onnx(make_session(out / "model_fp32.onnx"), ids)
    got = run_onnx(make_session(out / "model_int8.onnx"), ids)
    assert report["metric_int8"] == pytest.approx(mean_cosine(ref, got), abs=1e-9)
    assert report["nn_agreement"] == pytest.approx(nn_agreement(ref, got))
    with torch.no_grad():
        torch.testing.assert_close(ref, lowbit.zoo.load_model("minilm-l6").model(ids), rtol=1e-4, atol=1e-5)


def test_existing_output_needs_force_and_convolutions_are_refused(minilm_run, tmp_path, capsys):
    _, out = minilm_run
    rc = main(["quantize", "--mode", "dynamic", "--model", "minilm-l6", "--data", "sentences", "--out", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((4, 3, 8, 8), dtype=np.float32))
    rc = main(["quantize", "--mode", "dynamic", "--model", "lowbit_cli_models:tiny", "--input-shape", "1,3,8,8",
               "--data", str(data), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lowbit: error: layer conv: dynamic quantization of Conv2d is refused")
    assert not (tmp_path / "d").exists()



class _Bag(torch.nn.Module):
    """Token ids → mean of embedded tokens → Linear: a tiny model with an int64 input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(dim=1))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_pipeline_handles_integer_inputs_in_both_modes(tmp_path, mode):
    from lowbit.jobs import quantize_to_dir
    from lowbit.transforms.dynamic import dynamic_recipe

    torch.manual_seed(0)
    ids = torch.randint(0, 30, (12, 5))
    recipe = dynamic_recipe() if mode == "dynamic" else lowbit.preset("int8").with_calibrator("minmax")
    result = quantize_to_dir(_Bag().eval(), ids[:1], ids if mode == "static" else None, recipe, tmp_path / mode,
                             ids, mode=mode, embedding=True, repeats=1)
    assert sorted(os.listdir(tmp_path / mode)) == FILES
    r = result.report
    assert r["mode"] == mode and r["metric_int8"] > 0.99 and r["int8_kernels"] > 0
    assert json.loads((tmp_path / mode / "report.json").read_text())["metric_int8"] == pytest.approx(r["metric_int8"])
