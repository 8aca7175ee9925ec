"""``lowbit qat``: parse the options into :func:`lowbit.jobs.qat.run_qat`, run it and print the training log.

    lowbit qat --model M --data D --recipe R --epochs E --out DIR [--distill [kl|mse]] [--nproc N] [--force]

The job (:mod:`lowbit.jobs.qat`) writes what ``quantize`` writes plus ``checkpoint.pt`` and a training log.

Training data: the ``digits`` train split (with labels); for ``photos``, 256 views of the calibration photos
drawn with another seed than the calibration views (no labels); for a folder or a tensor file, its inputs
(no labels). Without labels the model is distilled from FP32 (``--distill kl`` unless told otherwise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lowbit.cli.launch import is_writer, shard_calibration
from lowbit.cli.sources import add_source_args, load_data_source, load_eval_fn, load_model_source
from lowbit.jobs.qat import QATSettings, run_qat as run_qat_job
from lowbit.qat.distill import DISTILL_LOSSES
from lowbit.report.evaluate import EvalSet
from lowbit.transforms.recipe import load_recipe

console = Console()
PHOTOS_N_TRAIN = 256
PHOTOS_TRAIN_SEED = 1


def add_qat_args(p: argparse.ArgumentParser) -> None:
    """The ``qat`` subcommand's options."""
    add_source_args(p)
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


def run_qat(args: argparse.Namespace) -> int:
    """The ``qat`` command on this rank (rank 0 writes ``--out`` and prints; other ranks train and exit)."""
    settings = QATSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, distill=args.distill,
                           temperature=args.temperature, init=args.init, observer_steps=args.observer_steps,
                           freeze_bn_step=args.freeze_bn_step, weight_init=args.weight_init, seed=args.seed)
    settings.check()
    recipe = load_recipe(args.recipe)
    if args.calibrator:
        recipe = recipe.with_calibrator(args.calibrator)
    src = load_model_source(args.model, args.input_shape)
    calib, ev = load_data_source(args.data, src, args.n_calib, args.n_eval, args.workers)
    train_x, train_y, train_note = training_data(args.data, calib, args.n_train)
    eval_fn = load_eval_fn(args.eval)
    if eval_fn is not None:
        ev = EvalSet(ev.inputs, ev.labels, eval_fn, metric_name=args.eval, note=ev.note)
    labels = {"model": src.name, "data": args.data, "recipe": args.recipe, "calibrator": recipe.default_input.calibrator,
              "method": "qat"}
    result = run_qat_job(src.model, src.example_input, shard_calibration(calib, recipe), ev, recipe, args.out,
                         train_x, train_y, train_note, settings, force=args.force, labels=labels,
                         threads=args.threads, repeats=args.repeats, device=args.device)
    if is_writer():
        print_training(result.report, Path(args.out))
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
