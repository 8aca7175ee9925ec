"""``lowbit quantize --mode dynamic`` and ``lowbit quantize`` on embedding data (``--data sentences``).

Dynamic mode needs no calibration: weights are quantized offline, activations at run time. ``--recipe int8``
(the default) means :func:`lowbit.transforms.dynamic.dynamic_recipe` there: int8 per-channel weights (7-bit
on CPUs without VNNI) and per-token uint8 activations; a YAML recipe picks per-tensor activations with
``input: {granularity: per_tensor}`` and keeps layers in float with rules. Convolutions are refused.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from lowbit.cli.sources import load_data_source, load_model_source
from lowbit.jobs import quantize_to_dir
from lowbit.report.token_models import EMBEDDING_METRIC, summary_rows
from lowbit.report.evaluate import EvalSet
from lowbit.transforms.dynamic import dynamic_recipe
from lowbit.transforms.recipe import load_recipe

EMBEDDING_DATA = ("sentences",)
console = Console(stderr=False)


def wants_mode_pipeline(args: argparse.Namespace, data_spec: str) -> bool:
    """True when ``quantize`` must run here: dynamic mode, or data whose metric is embedding similarity."""
    return getattr(args, "mode", "static") == "dynamic" or data_spec in EMBEDDING_DATA


def _recipe(args: argparse.Namespace, recipe_spec: str, mode: str):
    if mode == "dynamic":
        return dynamic_recipe() if recipe_spec == "int8" else load_recipe(recipe_spec)
    recipe = load_recipe(recipe_spec)
    calibrator = getattr(args, "calibrator", None)
    return recipe.with_calibrator(calibrator) if calibrator else recipe


def run_mode_quantize(args: argparse.Namespace, model_spec: str, data_spec: str, recipe_spec: str) -> int:
    """Load sources, quantize in ``args.mode``, write the outputs and print the summary table."""
    mode = getattr(args, "mode", "static")
    recipe = _recipe(args, recipe_spec, mode)
    src = load_model_source(model_spec, getattr(args, "input_shape", None))
    calib, ev = load_data_source(data_spec, src, args.n_calib, args.n_eval, getattr(args, "workers", 0))
    embedding = ev.metric_name == EMBEDDING_METRIC
    if embedding:
        from lowbit.zoo.sentences import length_batches

        calib = length_batches(calib)
    labels = {"model": src.name, "data": data_spec, "recipe": recipe_spec}
    result = quantize_to_dir(src.model, src.example_input, calib if mode == "static" else None, recipe, args.out,
                             EvalSet(ev.inputs, note=ev.note), force=args.force, labels=labels, threads=args.threads,
                             repeats=args.repeats, mode=mode, embedding=embedding, device=getattr(args, "device", None))
    table = Table(title=f"lowbit: {src.name} → {mode} INT8 ({recipe_spec})")
    for col in ("measure", "FP32", "quantized (ONNX Runtime)"):
        table.add_column(col)
    for row in summary_rows(result.report):
        table.add_row(*row)
    table.add_row("layers left in float", "", str(len(result.report["float_layers"])))
    console.print(table)
    console.print(f"wrote {result.out_dir}/ (model_fp32.onnx, model_int8.onnx, recipe.yaml, report.json, report.md)")
    return 0
