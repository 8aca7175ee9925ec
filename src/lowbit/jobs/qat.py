"""The QAT job: fine-tune with quantization in the loop, then write what the quantize job writes.

PTQ calibration of a QAT-prepared copy (``init="ptq"``, the default, so training starts at the PTQ accuracy;
``init="observer"`` starts from EMA observers instead) → training (AdamW, the three-phase schedule, labels or
distillation from the FP32 model) with the simulated metric after every epoch → ``convert_`` → the same ONNX
export, parity check and ONNX Runtime report as the quantize job. ``DIR`` gets ``model_fp32.onnx``,
``model_int8.onnx``, ``recipe.yaml``, ``report.json`` and ``report.md`` (both with a training log: one line per
epoch) and ``checkpoint.pt`` (the QAT model before conversion, optimizer and schedule;
``lowbit.qat.train.load_checkpoint`` resumes from it).

Under several processes every rank trains; only rank 0 writes ``DIR``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.analysis import metrics
from lowbit.device import place
from lowbit.data import Data, rank_and_world
from lowbit.jobs.outputs import export_models, float_layers, run_facts, write_report
from lowbit.outdir import check_output_dir, staged_output
from lowbit.qat import QATConfig, convert_, prepare_qat_
from lowbit.qat.train import TrainConfig, TrainState, save_checkpoint, train_qat
from lowbit.report.evaluate import EvalSet, evaluate_pair, torch_predict
from lowbit.transforms.recipe import Recipe


@dataclass(frozen=True)
class QATSettings:
    """How to train (the ``lowbit qat`` options)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    distill: str | None = None  # None: labels when there are some, else kl
    temperature: float = 1.0
    init: str = "ptq"
    observer_steps: int = 50
    freeze_bn_step: int | None = None
    weight_init: str = "observer"
    seed: int = 0

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.observer_steps < 0:
            raise ValueError(f"--observer-steps must be >= 0, got {self.observer_steps}")


@dataclass
class QATResult:
    """What ``run_qat`` produced; ``report`` and ``out_dir`` are None on ranks that do not write."""

    model: nn.Module
    training: dict
    report: dict | None
    out_dir: Path | None


def _evaluator(ev: EvalSet, reference: torch.Tensor):
    """``evaluate(model) -> metric`` in the PyTorch simulation (eval mode, restored afterwards)."""

    def evaluate(model) -> float:
        was_training = model.training
        model.eval()
        try:
            predict = torch_predict(model)
            if ev.eval_fn is not None:
                return float(ev.eval_fn(predict))
            out = predict(ev.inputs)
            return metrics.accuracy(out, ev.labels) if ev.labels is not None else metrics.top1_agreement(reference, out)
        finally:
            model.train(was_training)
    return evaluate


def training_markdown(training: dict) -> str:
    """The report.md section with the training set-up and one line per epoch."""
    lines = ["", "## Training log (QAT)", "",
             f"{training['epochs']} epochs on {training['train_data']}, batch {training['batch_size']}, AdamW lr "
             f"{training['lr']:g} with the {training['schedule']} schedule, "
             f"{'distillation (' + training['distill'] + ') from FP32' if training['distill'] else 'labels (cross-entropy)'}, "
             f"ranges from {training['init']}, {training['nproc']} process(es), {training['train_seconds']:.1f} s. "
             "Metrics are the PyTorch simulation on the evaluation set; the table above is ONNX Runtime.",
             "", "| epoch | loss | lr (end) | metric (simulated) | seconds |", "|---:|---:|---:|---:|---:|",
             f"| 0 (start) | | | {training['metric_start']:.4f} | |"]
    for e in training["log"]:
        metric = "" if e["metric"] is None else f"{e['metric']:.4f}"
        lines.append(f"| {e['epoch']} | {e['loss']:.4f} | {e['lr']:.3g} | {metric} | {e['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, force: bool, qmodel, teacher, example: torch.Tensor, recipe: Recipe, ev: EvalSet,
           state: TrainState, training: dict, labels: dict, threads: int, repeats: int) -> dict:
    with staged_output(out_dir, force) as staging:
        save_checkpoint(staging / "checkpoint.pt", qmodel, state, recipe=recipe.to_yaml(), training=training)
        convert_(qmodel)
        # model_fp32.onnx from the *original* float model (QAT changed the weights of qmodel)
        fp32_path, int8_path = export_models(staging, teacher, qmodel, example, recipe)
        report = dict(labels)
        report.update(evaluate_pair(fp32_path, int8_path, qmodel, ev, threads, repeats))
        report.update({"target": recipe.target, "calib_seconds": training["calib_seconds"],
                       "float_layers": float_layers(qmodel), "training": training, **run_facts()})
        write_report(staging, report, markdown_tail=training_markdown(training))
    return report


def run_qat(model: nn.Module, example_input: torch.Tensor, calib: Data, ev: EvalSet, recipe: Recipe,
            out_dir: str | Path, train_x: torch.Tensor, train_y: torch.Tensor | None, train_note: str,
            settings: QATSettings = QATSettings(), force: bool = False, labels: dict | None = None,
            threads: int = 2, repeats: int = 20, device: str | torch.device | None = None) -> QATResult:
    """The QAT job on this rank (rank 0 writes ``out_dir``; other ranks train and return without a report).

    Args:
        calib: calibration data for the PTQ start (already sharded across ranks when several processes run).
        ev: what the simulated metric per epoch and the report are measured on.
        train_x, train_y: training inputs and labels (None: distilled from the FP32 model).
        train_note: how the training data is described in the report.
        device: where calibration, training and the simulated metric run (``cpu``, ``cuda``, ``auto``; None:
            ``model``'s device). Training batches move there as they are drawn; export runs on a CPU copy.
    """
    settings.check()
    recipe = recipe.for_machine()  # this machine's weight bits, written into recipe.yaml
    out_dir = Path(out_dir)
    writer = rank_and_world()[0] == 0
    distill = settings.distill or (None if train_y is not None else "kl")
    if writer:
        check_output_dir(out_dir, force)
    model = place(model, device)
    teacher = copy.deepcopy(model).eval()
    reference = torch_predict(teacher)(ev.inputs)
    evaluate = _evaluator(ev, reference)
    config = QATConfig(observer_steps=settings.observer_steps, freeze_bn_step=settings.freeze_bn_step,
                       weight_init=settings.weight_init)
    t0 = time.perf_counter()
    qmodel = prepare_qat_(copy.deepcopy(model).eval(), recipe, example_input, config,
                          from_ptq=settings.init == "ptq", calib_data=calib)
    calib_seconds = time.perf_counter() - t0
    metric_start = evaluate(qmodel) if writer else float("nan")
    train_cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, distill=distill,
                            temperature=settings.temperature, seed=settings.seed)
    t0 = time.perf_counter()
    state = train_qat(qmodel, train_x, None if distill else train_y, teacher if distill else None, train_cfg,
                      evaluate)
    training = {
        "method": "qat", "epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
        "schedule": train_cfg.schedule, "distill": distill, "temperature": settings.temperature, "init": settings.init,
        "observer_steps": settings.observer_steps, "freeze_bn_step": settings.freeze_bn_step,
        "weight_init": settings.weight_init, "nproc": rank_and_world()[1], "train_data": train_note,
        "train_samples": int(len(train_x)), "calib_seconds": calib_seconds, "train_seconds": time.perf_counter() - t0,
        "metric_name": ev.metric_name, "metric_start": metric_start, "log": [e.to_dict() for e in state.log],
    }
    if not writer:
        return QATResult(qmodel, training, None, None)
    report = _write(out_dir, force, qmodel, teacher, example_input, recipe, ev, state, training, labels or {},
                    threads, repeats)
    return QATResult(qmodel, training, report, out_dir)
