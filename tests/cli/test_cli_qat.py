"""lowbit qat end to end (the quantize outputs, the training log, a checkpoint that reloads into the same
model), its errors, and --nproc for qat and quantize (2 local gloo workers; quantize's INT8 model equals the
single-process one initializer for initializer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

import lowbit
from lowbit import qat
from lowbit.cli.main import main
from lowbit.report.render import REQUIRED_KEYS

FILES = ["checkpoint.pt", "model_fp32.onnx", "model_int8.onnx", "recipe.yaml", "report.json", "report.md"]
QUICK = ["--repeats", "1", "--threads", "1", "--n-eval", "64"]


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits-qat"
    rc = main(["qat", "--model", "digits-cnn", "--data", "digits", "--epochs", "2", "--n-train", "256",
               "--out", str(out), "--freeze-bn-step", "10", *QUICK])
    return rc, out


def test_qat_writes_the_quantize_outputs_a_checkpoint_and_a_training_log(qat_run):
    rc, out = qat_run
    assert rc == 0 and sorted(os.listdir(out)) == FILES
    report = json.loads((out / "report.json").read_text())
    assert all(key in report for key in REQUIRED_KEYS) and report["parity_ok"] is True
    training = report["training"]
    assert training["method"] == "qat" and training["init"] == "ptq" and training["distill"] is None
    assert [e["epoch"] for e in training["log"]] == [1, 2] and training["train_samples"] == 256
    assert all(0.0 <= e["metric"] <= 1.0 and e["loss"] > 0 for e in training["log"])
    assert training["log"][-1]["metric"] == pytest.approx(report["metric_int8_simulated"], abs=1 / 64)
    md = (out / "report.md").read_text()
    assert "## Training log (QAT)" in md and "| 2 |" in md
    assert lowbit.load_recipe(out / "recipe.yaml") == lowbit.preset("int8")


def test_checkpoint_reloads_into_the_model_that_was_exported(qat_run, digits):
    _, out = qat_run
    model, _, x_eval, y_eval = digits
    fresh = qat.prepare_qat_(model.__class__(), lowbit.preset("int8"), x_eval[:1], qat.QATConfig(freeze_bn_step=10))
    state = qat.make_train_state(fresh, qat.TrainConfig(epochs=2), steps_per_epoch=8)
    meta = qat.load_checkpoint(out / "checkpoint.pt", fresh, state)
    assert state.epochs_done == 2 and meta["training"]["epochs"] == 2
    qat.convert_(fresh)
    report = json.loads((out / "report.json").read_text())
    parity = lowbit.check_onnx_parity(fresh, out / "model_int8.onnx", x_eval[:64])
    assert parity.ok and parity.fraction_within_step == 1.0  # the engine-exact simulation of the exported file
    with torch.no_grad():
        accuracy = float((fresh(x_eval[:64]).argmax(1) == y_eval[:64]).double().mean())
    assert accuracy == report["metric_int8_simulated"]


def test_qat_refuses_bad_arguments_and_existing_output(qat_run, capsys):
    _, out = qat_run
    assert main(["qat", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--epochs", "1"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["qat", "--model", "digits-cnn", "--data", "digits", "--out", str(out) + "x", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    # --nproc checks the output folder before starting any worker
    assert main(["qat", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--nproc", "2"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_qat_nproc_2_trains_in_two_processes_and_rank_0_writes(tmp_path, capfd):
    out = tmp_path / "qat2"
    rc = main(["qat", "--model", "digits-cnn", "--data", "digits", "--epochs", "1", "--n-train", "128",
               "--out", str(out), "--nproc", "2", *QUICK])  # this process launches 2 workers and waits
    assert rc == 0, capfd.readouterr().err[-2000:]
    assert sorted(os.listdir(out)) == FILES and sorted(p.name for p in tmp_path.iterdir()) == ["qat2"]
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["nproc"] == 2 and report["parity_ok"] is True


@pytest.mark.slow
def test_quantize_nproc_2_equals_one_process(tmp_path, capfd):
    common = ["quantize", "--model", "digits-cnn", "--data", "digits", "--n-calib", "128", *QUICK]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same activations to the last bit
    try:
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0, capfd.readouterr().err[-2000:]
    one, two = (_constants(tmp_path / d / "model_int8.onnx") for d in ("one", "two"))
    assert one.keys() == two.keys() and len(one) > 10
    for name, value in one.items():
        assert value.dtype == two[name].dtype and (value == two[name]).all(), name


def _constants(path: Path) -> dict:
    """Every constant tensor of an ONNX graph (initializers and Constant nodes: scales, zero-points, codes)."""
    graph = onnx.load(str(path)).graph
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def test_a_failing_worker_stops_the_others_and_leaves_no_staging_folder(tmp_path, monkeypatch):
    from lowbit.cli import launch

    fake = tmp_path / "fake-python"  # stands in for `python -m lowbit.cli.main`: rank 1 fails, rank 0 hangs
    fake.write_text(f"""#!/bin/sh
if [ "$RANK" = 1 ]; then sleep 1; exit 3; fi
mkdir -p {tmp_path}/.out.tmp-rank0
echo "$MASTER_ADDR $WORLD_SIZE $LOCAL_RANK" > {tmp_path}/env0
exec sleep 60
""")
    fake.chmod(0o755)
    monkeypatch.setattr(launch.sys, "executable", str(fake))
    monkeypatch.setattr(launch, "GRACE_S", 0.5)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.spawn_workers(["qat"], 2, tmp_path / "out") == 3
    assert not (tmp_path / ".out.tmp-rank0").exists()
    assert (tmp_path / "env0").read_text().split() == ["127.0.0.1", "2", "0"]
