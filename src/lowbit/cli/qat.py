"""``lowbit qat``: fine-tune with quantization in the loop, then write what ``quantize`` writes.

    lowbit qat --model M --data D --recipe R --epochs E --out DIR [--distill [kl|mse]] [--nproc N] [--force]

The job: PTQ calibration of a QAT-prepared copy (``--init ptq``, the default, so training starts at the PTQ
accuracy; ``--init observer`` starts from EMA observers instead) → training (AdamW, the three-phase
schedule, labels or distillation from the FP32 model) with the simulated metric after every epoch →
``convert_`` → the same ONNX export, parity check and ONNX Runtime report as ``quantize``. ``DIR`` gets
``model_fp32.onnx``, ``model_int8.onnx``, ``recipe.yaml``, ``report.json`` and ``report.md`` (both with a
training log: one line per epoch) and ``checkpoint.pt`` (the QAT model before conversion, optimizer and
schedule; ``lowbit.qat.train.load_checkpoint`` resumes from it).

Training data: the ``digits`` train split (with labels); for ``photos``, 256 views of the calibration photos
drawn with another seed than the calibration views (no labels); for a folder or a tensor file, its inputs
(no labels). Without labels the model is distilled from FP32 (``--distill kl`` unless told otherwise).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import logging
import time
from pathlib import Path

import onnxruntime
import torch
from rich.console import Console
from rich.table import Table

from lowbit.analysis import metrics
from lowbit.cli.launch import is_writer, shard_calibration
from lowbit.cli.sources import load_data_source, load_eval_fn, load_model_source
from lowbit.observers import OBSERVERS
from lowbit.export.onnx_export import export_onnx
from lowbit.export.trt_cache import write_trt_calibration_cache
from lowbit.outdir import staged_output
from lowbit.pipeline import __version__, _float_layers, check_output_dir, machine_description
from lowbit.qat import QATConfig, convert_, prepare_qat_
from lowbit.qat.distill import DISTILL_LOSSES
from lowbit.qat.train import TrainConfig, TrainState, save_checkpoint, train_qat
from lowbit.data import rank_and_world
from lowbit.report.evaluate import EvalSet, evaluate_pair, torch_predict
from lowbit.report.render import to_json, to_markdown
from lowbit.transforms.recipe import PRESETS, load_recipe
from lowbit.zoo import DATA_NAMES, MODEL_NAMES

log = logging.getLogger(__name__)
console = Console()
PHOTOS_N_TRAIN = 256
PHOTOS_TRAIN_SEED = 1


def add_qat_args(p: argparse.ArgumentParser) -> None:
    """The ``qat`` subcommand's options."""
    p.add_argument("--model", required=True, help=f"zoo name ({', '.join(MODEL_NAMES)}) or package.module:callable")
    p.add_argument("--data", required=True, help=f"zoo data ({', '.join(DATA_NAMES)}), an image folder, or a .npy/.pt file")
    p.add_argument("--recipe", default="int8", help=f"preset ({', '.join(PRESETS)}) or a YAML recipe file")
    p.add_argument("--calibrator", default=None, choices=sorted(OBSERVERS), help="activation calibrator (overrides the recipe)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--distill", nargs="?", const="kl", default=None, choices=sorted(DISTILL_LOSSES),
                   help="learn from the FP32 model instead of labels: kl on logits (default) or mse on embeddings")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (kl)")
    p.add_argument("--lr", type=float, default=1e-3, help="base learning rate of AdamW (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="global training batch size (default 32)")
    p.add_argument("--init", default="ptq", choices=("ptq", "observer"),
                   help="start from PTQ-calibrated ranges (default) or from EMA observers during training")
    p.add_argument("--observer-steps", type=int, default=50, help="with --init observer: steps before ranges are learnt")
    p.add_argument("--freeze-bn-step", type=int, default=None, help="training step after which BatchNorm statistics freeze")
    p.add_argument("--weight-init", default="observer", choices=("observer", "mse"),
                   help="learnable weight ranges start from the observer/PTQ ranges or the least-MSE clipping")
    p.add_argument("--n-train", type=int, default=None, help="number of training samples")
    p.add_argument("--n-calib", type=int, default=None, help="number of calibration samples")
    p.add_argument("--n-eval", type=int, default=None, help="number of evaluation samples")
    p.add_argument("--input-shape", default=None, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--eval", default=None, help="package.module:function(predict) -> metric")
    p.add_argument("--seed", type=int, default=0, help="seed of weight-independent randomness (shuffling)")
    p.add_argument("--nproc", type=int, default=None, help="train (and calibrate) in N local processes (gloo)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads for every measurement")
    p.add_argument("--repeats", type=int, default=20, help="latency repeats (median reported)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def training_data(spec: str, calib: torch.Tensor, n_train: int | None) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``(inputs, labels or None, description)`` to train on for ``--data spec``."""
    if spec == "digits":
        from lowbit.zoo.digits import load_digits_split

        split = load_digits_split()
        n = n_train or len(split.y_train)
        return split.x_train[:n].clone(), split.y_train[:n].clone(), f"digits train split ({n} labelled samples)"
    if spec == "photos":
        from lowbit.zoo.photos import photo_views

        n = n_train or PHOTOS_N_TRAIN
        return photo_views("calib", n, seed=PHOTOS_TRAIN_SEED), None, f"{n} views of the calibration photos (seed {PHOTOS_TRAIN_SEED})"
    x = calib[:n_train] if n_train else calib
    return x, None, f"the {len(x)} inputs of {spec} (no labels)"


def _evaluator(ev: EvalSet, reference: torch.Tensor, eval_fn):
    """``evaluate(model) -> metric`` in the PyTorch simulation (eval mode, restored afterwards)."""

    def evaluate(model) -> float:
        was_training = model.training
        model.eval()
        try:
            predict = torch_predict(model)
            if eval_fn is not None:
                return float(eval_fn(predict))
            out = predict(ev.inputs)
            return metrics.accuracy(out, ev.labels) if ev.labels is not None else metrics.top1_agreement(reference, out)
        finally:
            model.train(was_training)
    return evaluate


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.observer_steps < 0:
        raise ValueError(f"--observer-steps must be >= 0, got {args.observer_steps}")


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


def write_models(staging: Path, float_model, qmodel, example: torch.Tensor, recipe) -> tuple[Path, Path]:
    """``model_fp32.onnx`` from the *original* float model (QAT changed the weights of ``qmodel``),
    ``model_int8.onnx`` from the converted one, ``recipe.yaml`` (and the TensorRT cache)."""
    fp32_path, int8_path = staging / "model_fp32.onnx", staging / "model_int8.onnx"
    export_onnx(float_model, example, fp32_path, target=recipe.target, float_model=True)
    export_onnx(qmodel, example, int8_path, target=recipe.target, check_parity=False)  # parity: in the report
    if recipe.target == "tensorrt":
        write_trt_calibration_cache(int8_path, staging / "calibration.cache")
    (staging / "recipe.yaml").write_text(recipe.to_yaml())
    return fp32_path, int8_path


def _write(args, qmodel, teacher, src, recipe, ev: EvalSet, state: TrainState, training: dict, labels: dict) -> dict:
    out_dir = Path(args.out)
    with staged_output(out_dir, args.force) as staging:
        save_checkpoint(staging / "checkpoint.pt", qmodel, state, recipe=recipe.to_yaml(), training=training)
        convert_(qmodel)
        fp32_path, int8_path = write_models(staging, teacher, qmodel, src.example_input, recipe)
        report = dict(labels)
        report.update(evaluate_pair(fp32_path, int8_path, qmodel, ev, args.threads, args.repeats))
        report.update({
            "target": recipe.target, "calib_seconds": training["calib_seconds"], "float_layers": _float_layers(qmodel),
            "training": training, "lowbit_version": __version__, "onnxruntime_version": onnxruntime.__version__,
            "torch_version": torch.__version__, "machine": machine_description(), "date": _dt.date.today().isoformat(),
        })
        (staging / "report.json").write_text(to_json(report))
        (staging / "report.md").write_text(to_markdown(report) + training_markdown(training))
    return report


def run_qat(args: argparse.Namespace) -> int:
    """The ``qat`` job on this rank (rank 0 writes ``--out``; other ranks train and exit)."""
    _check_args(args)
    recipe = load_recipe(args.recipe)
    if args.calibrator:
        recipe = recipe.with_calibrator(args.calibrator)
    src = load_model_source(args.model, args.input_shape)
    calib, ev = load_data_source(args.data, src, args.n_calib, args.n_eval)
    train_x, train_y, train_note = training_data(args.data, calib, args.n_train)
    distill = args.distill or (None if train_y is not None else "kl")
    eval_fn = load_eval_fn(args.eval)
    if eval_fn is not None:
        ev = EvalSet(ev.inputs, ev.labels, eval_fn, metric_name=args.eval, note=ev.note)
    if is_writer():
        check_output_dir(Path(args.out), args.force)
    teacher = copy.deepcopy(src.model).eval()
    reference = torch_predict(teacher)(ev.inputs)
    evaluate = _evaluator(ev, reference, eval_fn)
    config = QATConfig(observer_steps=args.observer_steps, freeze_bn_step=args.freeze_bn_step, weight_init=args.weight_init)
    t0 = time.perf_counter()
    qmodel = prepare_qat_(copy.deepcopy(src.model).eval(), recipe, src.example_input, config,
                          from_ptq=args.init == "ptq", calib_data=shard_calibration(calib, recipe))
    calib_seconds = time.perf_counter() - t0
    metric_start = evaluate(qmodel) if is_writer() else float("nan")
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, distill=distill,
                            temperature=args.temperature, seed=args.seed)
    t0 = time.perf_counter()
    state = train_qat(qmodel, train_x, None if distill else train_y, teacher if distill else None, train_cfg,
                      evaluate)
    training = {
        "method": "qat", "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "schedule": train_cfg.schedule, "distill": distill, "temperature": args.temperature, "init": args.init,
        "observer_steps": args.observer_steps, "freeze_bn_step": args.freeze_bn_step, "weight_init": args.weight_init,
        "nproc": rank_and_world()[1], "train_data": train_note, "train_samples": int(len(train_x)),
        "calib_seconds": calib_seconds, "train_seconds": time.perf_counter() - t0, "metric_name": ev.metric_name,
        "metric_start": metric_start, "log": [e.to_dict() for e in state.log],
    }
    if not is_writer():
        return 0
    labels = {"model": src.name, "data": args.data, "recipe": args.recipe, "calibrator": recipe.default_input.calibrator,
              "method": "qat"}
    report = _write(args, qmodel, teacher, src, recipe, ev, state, training, labels)
    print_training(report, Path(args.out))
    return 0


def print_training(report: dict, out_dir: Path) -> None:
    """The terminal summary: the training log, then the ONNX Runtime figures."""
    training = report["training"]
    table = Table(title=f"lowbit qat: {report.get('model')} ({report.get('recipe')}), {training['epochs']} epochs")
    for col in ("epoch", "loss", "metric (simulated)", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("start", "", f"{training['metric_start']:.4f}", "")
    for e in training["log"]:
        table.add_row(str(e["epoch"]), f"{e['loss']:.4f}", "" if e["metric"] is None else f"{e['metric']:.4f}",
                      f"{e['seconds']:.1f}")
    console.print(table)
    console.print(f"ONNX Runtime: {report['metric_name']} FP32 {report['metric_fp32']:.4f}, INT8 {report['metric_int8']:.4f}, "
                  f"top-1 agreement {report['top1_agreement']:.4f}, parity {'OK' if report['parity_ok'] else 'FAILED'}")
    console.print(f"wrote {out_dir}/ (model_fp32.onnx, model_int8.onnx, recipe.yaml, report.json, report.md, checkpoint.pt)",
                  highlight=False)
