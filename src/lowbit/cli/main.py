"""``lowbit`` command line: thin wrappers that build a Recipe and call one public function.

    lowbit quantize --model M --data D --recipe R --calibrator C --out DIR [--mode static|dynamic] [--eval module:function] [--force]
                    [--device cpu|cuda|auto] [--workers N]
    lowbit demo [--out DIR]
    lowbit analyze --model M --data D --recipe R --out DIR [--budget-seconds S] [--force]
    lowbit qat --model M --data D --recipe R --epochs E --out DIR [--distill] [--nproc N] [--force]
    lowbit serve DIR --port P [--shadow-rate 0.05] [--max-bad 5] [--threshold kl=0.2,sqnr_db=8]
    lowbit recalibrate DIR --data D

``--nproc N`` (quantize, qat) runs the command in N local processes (see ``cli.launch``). ``--device`` (quantize,
demo, analyze, qat; default cpu) is where they compute: ``cuda`` without CUDA is a one-line error; under several
processes each takes ``cuda:LOCAL_RANK`` and the group uses NCCL. ``--workers N`` reads an image folder or a
``.npy`` file in N DataLoader processes; long steps draw progress bars with the time left.

Every failure the user can fix prints one line ``lowbit: error: ...`` naming the culprit and exits 2.
SIGTERM (systemd, Docker, Kubernetes) is handled like Ctrl-C: staging folders are removed, the output lock is
released, exit 143 (130 for SIGINT). ``lowbit serve`` shuts down gracefully on both.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from lowbit.cli.analyze import add_analyze_args, run_analyze
from lowbit.cli.dynamic import run_mode_quantize, wants_mode_pipeline
from lowbit.cli.bars import progress_bars
from lowbit.cli.launch import (follow_quantize, is_writer, is_writer_env, maybe_launch, process_group,
                               shard_calibration)
from lowbit.cli.qat import add_qat_args, run_qat
from lowbit.cli.search_args import add_search_args, run_search
from lowbit.cli.serve import add_recalibrate_args, add_serve_args, run_recalibrate, run_serve
from lowbit.cli.sources import SourceError, add_device_args, load_data_source, load_eval_fn, load_model_source
from lowbit.device import check_local_processes, process_group_backend, rank_device, resolve_device
from lowbit.export.litert import require_litert
from lowbit.jobs import quantize_to_dir
from lowbit.observers import OBSERVERS
from lowbit.outdir import OutputExistsError
from lowbit.report.evaluate import EvalSet
from lowbit.report.litert import summary_rows as litert_summary_rows
from lowbit.report.render import summary_rows
from lowbit.transforms.recipe import PRESETS, load_recipe
from lowbit.zoo import DATA_NAMES, MODEL_NAMES

log = logging.getLogger("lowbit")
MAX_MESSAGE = 500  # characters of an error line: a message never floods the terminal with a user value
console = Console(stderr=False)


def _budget_mb(text: str) -> float:
    """``--memory-budget-mb``: a number of MiB >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {text[:20]!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 MiB, got {text[:20]!r}")
    return value


def _add_quantize_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", required=True, help=f"zoo name ({', '.join(MODEL_NAMES)}) or package.module:callable")
        p.add_argument("--data", required=True, help=f"zoo data ({', '.join(DATA_NAMES)}), an image folder, or a .npy/.pt file")
        p.add_argument("--recipe", default="int8", help=f"preset ({', '.join(PRESETS)}) or a YAML recipe file")
        p.add_argument("--calibrator", default=None, choices=sorted(OBSERVERS), help="activation calibrator (overrides the recipe)")
        p.add_argument("--out", required=True, type=Path, help="output folder")
        p.add_argument("--eval", default=None, help="package.module:function(predict) -> metric")
        p.add_argument("--input-shape", default=None, help="example input shape, e.g. 1,3,224,224")
        p.add_argument("--mode", choices=("static", "dynamic"), default="static",
                       help="static: calibrated activations (default); dynamic: activations quantized at run time")
        p.add_argument("--passes", default=None,
                       help="post-training passes, comma-separated (cle, bias_correction, adaround, gptq; run in that "
                            "pipeline order); overrides the recipe's; 'none' for none")
        p.add_argument("--pass-batches", type=int, default=None, help="calibration batches the passes see (default all)")
        p.add_argument("--memory-budget-mb", type=_budget_mb, default=None,
                       help="activations GPTQ / AdaRound / bias correction keep between layers (default 2048; 0: keep "
                            "none and re-run the model up to each layer)")
        p.add_argument("--nproc", type=int, default=None, help="calibrate in N local processes (gloo, torchrun-compatible)")
        p.add_argument("--io", choices=("float", "int8"), default="float",
                       help="recipe target litert: float input/output (quantized inside the model, default) or int8")
        add_search_args(p)
    else:
        p.add_argument("--out", type=Path, default=Path("lowbit-demo"), help="output folder (default lowbit-demo)")
    add_device_args(p)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--n-calib", type=int, default=None, help="number of calibration samples")
    p.add_argument("--n-eval", type=int, default=None, help="number of evaluation samples")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads for every measurement")
    p.add_argument("--repeats", type=int, default=20, help="latency repeats (median reported)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="PyTorch model → INT8 ONNX, measured honestly.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize_args(sub.add_parser("quantize", help="post-training quantization to INT8 ONNX with a report"))
    _add_quantize_args(sub.add_parser("demo", help="quantize efficientnet-lite0 on the built-in photos"), demo=True)
    add_analyze_args(sub.add_parser("analyze", help="per-layer quantization error, sensitivity and fixes (HTML + JSON)"))
    add_qat_args(sub.add_parser("qat", help="quantization-aware training, then the quantize outputs and a checkpoint"))
    add_serve_args(sub.add_parser("serve", help="serve DIR/model_int8.onnx over HTTP with a float shadow and a fuse"))
    add_recalibrate_args(sub.add_parser("recalibrate", help="new INT8 version of DIR from fresh data, kept if better"))
    return parser


def print_report(report: dict, out_dir: Path) -> None:
    """The terminal table comparing FP32 and INT8."""
    if report.get("capture"):
        console.print(report["capture"])
    litert = report.get("target") == "litert"
    table = Table(title=f"lowbit: {report.get('model')} → INT8 ({report.get('recipe')}, {report.get('calibrator')})")
    for col in ("measure", "FP32", "INT8 (LiteRT)" if litert else "INT8 (ONNX Runtime)"):
        table.add_column(col)
    for row in (litert_summary_rows if litert else summary_rows)(report):
        table.add_row(*row)
    par = report["parity"]
    table.add_row("parity sim vs engine", "", f"{'OK' if report['parity_ok'] else 'FAILED'} "
                  f"({par['fraction_within_step'] * 100:.2f}% within one output step"
                  + (f"; tensor by tensor {par['segment']['min_fraction_equal'] * 100:.3f}%+ identical codes"
                     if par.get("segment") else "") + ")")
    table.add_row("layers left in float", "", str(len(report["float_layers"])))
    console.print(table)
    ext = "tflite" if litert else "onnx"
    console.print(f"wrote {out_dir}/ (model_fp32.{ext}, model_int8.{ext}, recipe.yaml, report.json, report.md, "
                  "trusted_inputs.npy)")


def run_quantize(args: argparse.Namespace, model_spec: str, data_spec: str, recipe_spec: str) -> int:
    if wants_mode_pipeline(args, data_spec):  # --mode dynamic, or embedding data (sentences)
        return run_mode_quantize(args, model_spec, data_spec, recipe_spec)
    recipe = load_recipe(recipe_spec)
    if recipe.target == "litert":
        require_litert()  # one line naming the extra to install, before any long work
    elif getattr(args, "io", "float") != "float":
        raise ValueError("--io int8 applies to recipe target litert only (e.g. --recipe litert-int8)")
    if getattr(args, "passes", None) is not None:
        recipe = recipe.with_passes(*parse_passes(args.passes))
    calibrator = getattr(args, "calibrator", None)
    if calibrator:
        recipe = recipe.with_calibrator(calibrator)
    src = load_model_source(model_spec, getattr(args, "input_shape", None))
    calib, ev = load_data_source(data_spec, src, args.n_calib, args.n_eval, args.workers)
    eval_fn = load_eval_fn(getattr(args, "eval", None))
    if eval_fn is not None:
        ev = EvalSet(ev.inputs, ev.labels, eval_fn, metric_name=getattr(args, "eval"), note=ev.note)
    labels = {"model": src.name, "data": data_spec, "recipe": recipe_spec,
              "calibrator": recipe.default_input.calibrator}
    recipe, on_report = run_search(args, src.model, src.example_input, calib, ev, recipe, f"lowbit search: {src.name}")
    calib = shard_calibration(calib, recipe)  # --nproc / torchrun: each rank calibrates its shard, observers merged
    if not is_writer():
        return follow_quantize(src.model, src.example_input, calib, recipe, args.device)
    result = quantize_to_dir(src.model, src.example_input, calib, recipe, args.out, ev, force=args.force,
                             labels=labels, threads=args.threads, repeats=args.repeats, on_report=on_report,
                             pass_batches=getattr(args, "pass_batches", None), io=getattr(args, "io", "float"),
                             device=args.device, memory_budget_mb=getattr(args, "memory_budget_mb", None))
    print_report(result.report, result.out_dir)
    return 0


def parse_passes(text: str) -> list[str]:
    """``--passes cle,adaround`` → ``["cle", "adaround"]`` (``none`` → no pass)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    return [] if names == ["none"] else names


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so every ``finally`` / staging clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


def _install_sigterm() -> None:
    """SIGTERM → :class:`Terminated` in the main thread (a no-op off the main thread)."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        pass


def _setup_logging(debug: bool, plain: bool = False) -> None:
    """Rich log lines for the batch commands; plain one-line records (with time) for ``lowbit serve``."""
    if plain:  # a server's log is read by machines: one record, one line, never wrapped
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        handler, fmt = RichHandler(console=Console(stderr=True), show_time=False, show_path=False), "%(message)s"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler], format=fmt)


def _shows_bars(args: argparse.Namespace) -> bool:
    """Progress bars for the batch commands, drawn by the writing rank only."""
    return args.command in ("quantize", "demo", "analyze", "qat") and is_writer_env()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug, plain=args.command == "serve")
    _install_sigterm()
    try:
        device = resolve_device(getattr(args, "device", None))  # before any worker starts: one line if unusable
        check_local_processes(device, getattr(args, "nproc", None) or 1)
        launched = maybe_launch(args, argv)  # --nproc N > 1: N worker processes run this same command
        if launched is not None:
            return launched
        device = rank_device(device)  # cuda → cuda:LOCAL_RANK under torchrun / --nproc, made current
        if hasattr(args, "device"):
            args.device = device
        # a worker (ours or torchrun's) joins the group (NCCL on CUDA, gloo on CPU); no-op in one process
        with process_group(process_group_backend(device)), progress_bars(_shows_bars(args)):
            if args.command == "analyze":
                return run_analyze(args)
            if args.command == "qat":
                return run_qat(args)
            if args.command == "serve":
                return run_serve(args)
            if args.command == "recalibrate":
                return run_recalibrate(args)
            if args.command == "demo":
                return run_quantize(args, "efficientnet-lite0", "photos", "int8")
            return run_quantize(args, args.model, args.data, args.recipe)
    except (SourceError, OutputExistsError, ValueError, FileNotFoundError, RuntimeError, TypeError,
            PermissionError, NotADirectoryError, IsADirectoryError) as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0][:MAX_MESSAGE] if str(exc) else type(exc).__name__
        print(f"lowbit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print(f"lowbit: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; nothing was written",
              file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
