"""Quantization-aware training against FP32 and PTQ, in one run, same seeds, same epoch budget per model.

digits-cnn (metric: accuracy on the 449 labelled test digits), for W8A8, W4A4 and W2A4:

* FP32: the float model.
* PTQ: ``lowbit.quantize`` with the config's recipe (weights per-channel symmetric, min-max; activations
  asymmetric per-tensor, percentile) on the 270 calibration digits.
* QAT: ``qat.prepare_qat_(from_ptq=True, weight_init="mse")`` on the same calibration digits, then
  ``qat.train_qat`` on the 1078 labelled training digits (cross-entropy, AdamW lr 1e-3, the seed's three-phase
  schedule, batch 32, 20 epochs, BatchNorm simulated then frozen after 60 % of the steps), ``qat.convert_``.
  The weight ranges start from the least-MSE clipping (``weight_init="mse"``) instead of PTQ's min-max: at 2 bits
  min-max leaves almost every weight at zero. The training log's ``metric_start`` is that starting point.

efficientnet-lite0 (metric: top-1 agreement with FP32 on the 256 evaluation views), W4A8, label-free:

* PTQ as above (int4 weights, uint8 percentile activations) on the 64 calibration views.
* QAT: the same start, BatchNorm frozen from step 0 (batches of 8 are too small for batch statistics),
  distillation (KL on logits) from the FP32 model on 128 other views of the calibration photos (seed 1) at
  160x160 (steps 2x cheaper than at 224; evaluation stays at 224), 2 epochs of batch 8 (32 steps), AdamW at a
  constant lr 1e-4: with 32 steps the three-phase schedule would spend 10 of them at 1 % of the rate. CPU time
  caps this run (3 source photos, 32 steps): it shows the direction, not what QAT reaches with a training set.

``metric`` / ``top1_agreement`` are measured on the PyTorch simulation of the converted model (digits: the
engine-exact integer emulation where it applies; EfficientNet: the float fake-quant path, since the integer
emulation takes minutes on 256 views). Every quantized model is also exported with ``lowbit.export_onnx`` and
run by ONNX Runtime: ``metric_onnxruntime`` and ``parity_fraction`` (share of outputs within one step of the
simulation) say how far the deployed engine follows. ``seconds`` is the wall time of PTQ (calibration) or of QAT
(calibration + training). W8A8 uses the ``int8`` preset's weights: 7 bits on CPUs without VNNI (see README).

Usage: ``.venv/bin/python bench/qat.py [--quick] [--models NAME ...]``; writes ``bench/results/qat.json``
(``qat_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/RESULTS.md: spin-waiting threads on a busy machine

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import stamp, write_results  # noqa: E402

THREADS = 2
SEED = 0
KEYS = ("model", "config", "method", "metric", "top1_agreement", "epochs", "seconds")


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def recipes() -> dict:
    import lowbit
    from lowbit.core import PerChannel, PerTensor, QuantSpec

    def rec(wb: int, ab: int) -> lowbit.Recipe:
        return lowbit.Recipe(
            QuantSpec(bits=wb, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax"),
            QuantSpec(bits=ab, signed=False, symmetric=False, granularity=PerTensor(), calibrator="percentile"))

    int8 = lowbit.preset("int8").for_machine()
    return {"W8A8": int8, "W4A4": rec(4, 4), "W2A4": rec(2, 4), "W4A8": replace(int8, default_weight=replace(int8.default_weight, bits=4))}


def describe(recipe) -> str:
    w, a = recipe.default_weight, recipe.default_input
    return (f"weights int{w.bits} sym {w.granularity.kind} {w.calibrator}; "
            f"activations {'u' if not a.signed else ''}int{a.bits} {'asym' if not a.symmetric else 'sym'} "
            f"{a.granularity.kind} {a.calibrator}")


@contextlib.contextmanager
def float_fake_quant(model):
    """Evaluate on the float fake-quant path (no integer emulation, no autograd graph)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def outputs(model, x: torch.Tensor, fast_float: bool = False) -> torch.Tensor:
    model.eval()
    ctx = float_fake_quant(model) if fast_float else torch.no_grad()
    with ctx:
        return torch.cat([model(chunk) for chunk in x.split(32)]).detach()


class Scorer:
    """Metric and agreement of outputs against the labels / the FP32 outputs; ONNX Runtime for the deployed file."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor, example: torch.Tensor, tmp: Path):
        self.x, self.labels, self.ref, self.example, self.tmp = x, labels, ref, example, tmp

    def metric(self, out: torch.Tensor) -> float:
        from lowbit.analysis import metrics

        return metrics.accuracy(out, self.labels) if self.labels is not None else metrics.top1_agreement(self.ref, out)

    def row(self, out: torch.Tensor) -> dict:
        from lowbit.analysis import metrics

        return {"metric": self.metric(out), "top1_agreement": metrics.top1_agreement(self.ref, out),
                "kl": metrics.kl_softmax(self.ref, out)}

    def onnxruntime(self, model, sim: torch.Tensor, name: str) -> dict:
        import lowbit
        from lowbit.export.runtime import make_session, parity, run_session

        try:
            path = lowbit.export_onnx(model, self.example, self.tmp / f"{name}.onnx", check_parity=False)
            session = make_session(path, THREADS)
            out = torch.cat([run_session(session, chunk) for chunk in self.x.split(32)])
        except Exception as exc:  # an export the engine cannot take is a result, not a crash
            return {"onnxruntime_error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        par = parity(sim, out)
        return {"metric_onnxruntime": self.metric(out), "parity_fraction": par.fraction_within_step}


def run_ptq(zm, calib, recipe, scorer: Scorer, fast_float: bool, name: str) -> dict:
    import lowbit

    t0 = time.perf_counter()
    model = lowbit.quantize(zm.model, calib, recipe, zm.example_input, show_progress=False)
    seconds = time.perf_counter() - t0
    sim = outputs(model, scorer.x, fast_float)
    return {"method": "ptq", "epochs": 0, "seconds": seconds, **scorer.row(sim), **scorer.onnxruntime(model, sim, name)}


def run_qat(zm, calib, recipe, scorer: Scorer, train: dict, fast_float: bool, name: str) -> dict:
    from lowbit import qat

    torch.manual_seed(SEED)
    teacher = copy.deepcopy(zm.model).eval()
    t0 = time.perf_counter()
    model = qat.prepare_qat_(copy.deepcopy(zm.model), recipe, zm.example_input, train["qat"], from_ptq=True,
                             calib_data=calib)
    start = scorer.metric(outputs(model, scorer.x, fast_float=True)) if train["log_start"] else None
    model.train()
    state = qat.train_qat(model, train["x"], train["y"], teacher if train["config"].distill else None, train["config"],
                          evaluate=(lambda m: scorer.metric(outputs(m, scorer.x, fast_float=True))) if train["per_epoch"] else None)
    qat.convert_(model)
    seconds = time.perf_counter() - t0
    sim = outputs(model, scorer.x, fast_float)
    return {"method": "qat", "epochs": train["config"].epochs, "seconds": seconds, **scorer.row(sim),
            "metric_start": start, "metric_per_epoch": [e.metric for e in state.log],
            "loss_per_epoch": [e.loss for e in state.log], **scorer.onnxruntime(model, sim, name)}


def bench_digits(quick: bool, tmp: Path) -> list[dict]:
    from lowbit import qat, zoo
    from lowbit.zoo.digits import load_digits_split

    zm, zd, split = zoo.load_model("digits-cnn"), zoo.load_data("digits"), load_digits_split()
    epochs, batch = (2 if quick else 20), 32
    steps = epochs * -(-len(split.y_train) // batch)
    train = {"x": split.x_train, "y": split.y_train, "log_start": True, "per_epoch": True,
             "qat": qat.QATConfig(weight_init="mse", freeze_bn_step=int(0.6 * steps)),
             "config": qat.TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, seed=SEED)}
    ref = outputs(zm.model, zd.eval_inputs)
    scorer = Scorer(zd.eval_inputs, zd.eval_labels, ref, zm.example_input, tmp)
    rows = [{"model": "digits-cnn", "config": "FP32", "method": "fp32", "epochs": 0, "seconds": 0.0, **scorer.row(ref)}]
    for name in ("W8A8", "W4A4", "W2A4"):
        recipe = recipes()[name]
        for method in ("ptq", "qat"):
            t0 = time.perf_counter()
            if method == "ptq":
                row = run_ptq(zm, zd.calib, recipe, scorer, False, f"digits_{name}_ptq")
            else:
                row = run_qat(zm, zd.calib, recipe, scorer, train, False, f"digits_{name}_qat")
            rows.append({"model": "digits-cnn", "config": name, "recipe": describe(recipe), **row})
            say(f"digits-cnn {name} {method}: accuracy {row['metric']:.4f} (ORT {row.get('metric_onnxruntime')}) "
                f"in {time.perf_counter() - t0:.0f} s")
    return rows


def bench_effnet(quick: bool, tmp: Path) -> list[dict]:
    from lowbit import qat
    from lowbit.zoo import ZooModel, load_data, load_model
    from lowbit.zoo.photos import photo_views

    zm = load_model("efficientnet-lite0")
    size = 64 if quick else 224
    calib, x_eval = (photo_views("calib", 8, 0, size), photo_views("eval", 16, 0, size)) if quick else \
        (load_data("photos").calib, load_data("photos").eval_inputs)
    zm = ZooModel(zm.name, zm.model, calib[:1].clone(), zm.default_data)
    n_train, epochs, train_size = (16, 1, size) if quick else (128, 2, EFFNET_TRAIN_SIZE)
    train = {"x": photo_views("calib", n_train, seed=1, size=train_size), "y": None, "log_start": True,
             "per_epoch": False, "qat": qat.QATConfig(weight_init="mse", freeze_bn_step=0),
             "config": qat.TrainConfig(epochs=epochs, batch_size=8, lr=1e-4, distill="kl", schedule="constant",
                                       seed=SEED)}
    ref = outputs(zm.model, x_eval)
    scorer = Scorer(x_eval, None, ref, zm.example_input, tmp)
    recipe = recipes()["W4A8"]
    rows = [{"model": "efficientnet-lite0", "config": "FP32", "method": "fp32", "epochs": 0, "seconds": 0.0,
             **scorer.row(ref)}]
    for method in ("ptq", "qat"):
        t0 = time.perf_counter()
        if method == "ptq":
            row = run_ptq(zm, calib, recipe, scorer, True, "effnet_W4A8_ptq")
        else:
            row = run_qat(zm, calib, recipe, scorer, train, True, "effnet_W4A8_qat")
            row.update(train_views=n_train, train_size=train_size, distill="kl", schedule="constant", lr=1e-4)
        rows.append({"model": "efficientnet-lite0", "config": "W4A8", "recipe": describe(recipe), **row})
        say(f"efficientnet-lite0 W4A8 {method}: agreement {row['top1_agreement']:.4f} "
            f"(ORT {row.get('metric_onnxruntime')}) in {time.perf_counter() - t0:.0f} s")
    return rows


EFFNET_TRAIN_SIZE = 160  # training views are 160x160 (2x cheaper steps); evaluation stays at 224x224
BENCHES = {"digits-cnn": bench_digits, "efficientnet-lite0": bench_effnet}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 digits epochs, EfficientNet on 64x64 views")
    parser.add_argument("--models", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-qat-") as tmp:
        for name in args.models:
            rows += BENCHES[name](args.quick, Path(tmp))
    total = time.perf_counter() - t0
    say(f"total {total:.0f} s")
    common = stamp()
    ordered = [{**{k: r.get(k) for k in KEYS}, **{k: v for k, v in r.items() if k not in KEYS}, **common,
                "run_seconds": total} for r in rows]
    write_results("qat_quick" if args.quick else "qat", ordered)
    return ordered


if __name__ == "__main__":
    main()
