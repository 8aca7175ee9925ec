"""``lowbit serve`` and ``lowbit recalibrate``: the deployment guard on the command line.

    lowbit serve DIR [--host 127.0.0.1] --port P [--shadow-rate 0.05] [--max-bad 5] [--recover-good 20]
                 [--threshold kl=0.2,sqnr_db=8,top1_mismatch=1] [--precision int8|fp32] [--reservoir-size 256]
                 [--admin-token-file PATH] [--keep-versions 5] [--trusted-data FILE.npy]
                 [--read-timeout 10] [--max-connections 256]
    lowbit recalibrate DIR --data D [--n-calib N] [--trusted-data FILE.npy] [--keep-versions 5]

``DIR`` is a ``lowbit quantize`` output folder. See :mod:`lowbit.serve` for what the server does. The admin
token (``POST /recalibrate``) comes from ``--admin-token-file`` or the ``LOWBIT_ADMIN_TOKEN`` environment
variable; without one re-calibration over HTTP answers 403. A model folder is trusted code: re-calibration
imports and calls the float model it records.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lowbit import zoo
from lowbit.data import as_tensor
from lowbit.cli.sources import load_data_source, load_model_source
from lowbit.provenance import check_model_name
from lowbit.serve.app import create_app
from lowbit.serve.config import ServeConfig, Threshold
from lowbit.serve.models import active_version, check_model_dir, sample_shape_of, version_dir
from lowbit.serve.recalibrate import RecalibrationResult, read_model_name, recalibrate
from lowbit.serve.server import bind_socket, is_loopback, run_server

console = Console()
log = logging.getLogger(__name__)
TOKEN_ENV = "LOWBIT_ADMIN_TOKEN"


def float_model_loader(name: str, sample_shape: tuple[int, ...]):
    """Rebuild the float model ``name`` (zoo name or ``module:callable``) for re-calibration."""
    check_model_name(name)
    shape = None if name in zoo.MODEL_NAMES else ",".join(map(str, (1, *sample_shape)))
    src = load_model_source(name, shape)
    return src.model.eval(), src.example_input


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = ServeConfig(Path("."))
    p.add_argument("dir", type=Path, help="folder written by lowbit quantize (model_int8.onnx, model_fp32.onnx, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--shadow-rate", type=float, default=d.shadow_rate, help="share of requests also run on FP32")
    p.add_argument("--max-bad", type=int, default=d.max_bad, help="consecutive bad samples that switch to FP32")
    p.add_argument("--recover-good", type=int, default=d.recover_good,
                   help="consecutive good samples that switch back to INT8")
    p.add_argument("--threshold", default=None, help="when a sample is bad: kl=MAX,sqnr_db=MIN,top1_mismatch=MAX "
                   f"(default {','.join(f'{k}={v:g}' for k, v in d.threshold.to_dict().items())})")
    p.add_argument("--precision", default=d.precision, choices=("int8", "fp32"), help="int8 (guarded) or fp32")
    p.add_argument("--reservoir-size", type=int, default=d.reservoir_size, help="recent input rows kept")
    p.add_argument("--min-recalibration-samples", type=int, default=d.min_recalibration_samples)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most rows per request")
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime intra-op threads per session")
    p.add_argument("--workers", type=int, default=d.workers, help="inference threads")
    p.add_argument("--shadow-queue", type=int, default=d.shadow_queue, help="samples waiting for the shadow")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the shadow sampler")
    p.add_argument("--admin-token-file", type=Path, default=None,
                   help=f"file holding the bearer token of POST /recalibrate (or set {TOKEN_ENV}); none: 403")
    p.add_argument("--keep-versions", type=int, default=d.keep_versions, help="re-calibrated versions kept on disk")
    p.add_argument("--trusted-data", type=Path, default=None,
                   help="trusted input rows (.npy) a new version must not be worse on (default: the folder's own)")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="seconds a client has to send a whole request (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections beyond which requests get 503 (default %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def admin_token(path: Path | None) -> str | None:
    """The admin token from ``--admin-token-file`` (first line) or ``LOWBIT_ADMIN_TOKEN``; None when neither."""
    if path is not None:
        try:
            lines = path.read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--admin-token-file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"--admin-token-file {path}: the file is empty")
        return lines[0].strip()
    return os.environ.get(TOKEN_ENV, "").strip() or None


def run_serve(args: argparse.Namespace) -> int:
    config = ServeConfig(
        args.dir, shadow_rate=args.shadow_rate, max_bad=args.max_bad, recover_good=args.recover_good,
        threshold=Threshold.parse(args.threshold), precision=args.precision, reservoir_size=args.reservoir_size,
        max_batch=args.max_batch, threads=args.threads, workers=args.workers, shadow_queue=args.shadow_queue,
        min_recalibration_samples=args.min_recalibration_samples, seed=args.seed,
        admin_token=admin_token(args.admin_token_file), keep_versions=args.keep_versions,
        trusted_data=args.trusted_data, read_timeout=args.read_timeout, max_connections=args.max_connections)
    check_model_dir(config.model_dir)
    app = create_app(config, float_model_loader)
    sock = bind_socket(args.host, args.port)
    if config.admin_token is None and not is_loopback(args.host):
        log.warning("lowbit serve: listening on %s without an admin token: POST /recalibrate answers 403; anyone who "
                    "can reach the port can send predictions", args.host)
    host, port = sock.getsockname()[:2]
    models = app.engine.models
    console.print(f"lowbit serve: {config.model_dir} {models.version} ({config.precision}, shadow "
                  f"{config.shadow_rate:g}, {len(models.probes)} quantized activations watched) on "
                  f"http://{host}:{port}", highlight=False)
    try:
        run_server(app, sock, log_level="debug" if args.debug else "warning")
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        pass
    console.print("lowbit serve: stopped", highlight=False)
    return 0


def add_recalibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="folder written by lowbit quantize (and maybe lowbit serve)")
    p.add_argument("--data", required=True, help="fresh inputs: zoo data, an image folder, or a .npy/.pt file")
    p.add_argument("--n-calib", type=int, default=None, help="use at most N input rows")
    p.add_argument("--eval-fraction", type=float, default=0.25, help="share of rows held out to compare versions")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--trusted-data", type=Path, default=None,
                   help="trusted input rows (.npy) a new version must not be worse on (default: the folder's own)")
    p.add_argument("--keep-versions", type=int, default=5, help="re-calibrated versions kept on disk")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def run_recalibrate(args: argparse.Namespace) -> int:
    model_dir: Path = args.dir
    current = version_dir(model_dir, active_version(model_dir))
    check_model_dir(current)
    name, shape = read_model_name(model_dir), sample_shape_of(current / "model_fp32.onnx")
    src = load_model_source(name, None if name in zoo.MODEL_NAMES else ",".join(map(str, (1, *shape))))
    calib, _ = load_data_source(args.data, src, args.n_calib, None)
    calib = as_tensor(calib)  # recalibration splits the samples into calibration and evaluation
    result = recalibrate(model_dir, calib, lambda _n, _s: (src.model.eval(), src.example_input),
                         data_label=args.data, threads=args.threads, eval_fraction=args.eval_fraction,
                         trusted=args.trusted_data, keep_versions=args.keep_versions)
    print_recalibration(result)
    return 0


def print_recalibration(result: RecalibrationResult) -> None:
    table = Table(title=f"lowbit recalibrate: {result.previous} → {result.version} "
                        f"({'ACCEPTED, now active' if result.accepted else 'rejected, removed'})")
    for col in ("measure (held-out rows vs FP32)", result.previous, result.version):
        table.add_column(col)
    for key, fmt in (("top1_agreement", "{:.4f}"), ("kl", "{:.4g}"), ("sqnr_db", "{:.2f}")):
        table.add_row(key, fmt.format(result.current[key]), fmt.format(result.candidate[key]))
    t = result.trusted
    table.add_row(f"top-1 agreement on {t['rows']} trusted rows", f"{t['current']['top1_agreement']:.4f}",
                  f"{t['candidate']['top1_agreement']:.4f}")
    if "accuracy" in t["candidate"]:
        table.add_row("accuracy on the trusted rows", f"{t['current']['accuracy']:.4f}",
                      f"{t['candidate']['accuracy']:.4f}")
    table.add_row("parity sim vs engine", "", "OK" if result.parity_ok else "FAILED")
    console.print(table)
    where = f"wrote {result.folder}/" if result.accepted else "record in versions/recalibrations.jsonl"
    console.print(f"{result.reason}; {result.calib_samples} calibration / {result.eval_samples} held-out rows; "
                  f"{where}", highlight=False)
