"""Model versions on disk and the set of ONNX Runtime sessions that serves one of them.

Layout of a served folder ``DIR`` (written by ``lowbit quantize``)::

    DIR/model_int8.onnx, model_fp32.onnx, recipe.yaml, report.json, report.md   version v1 (the original)
    DIR/versions/v2/ ... same files + recalibration.json                         one folder per re-calibration
    DIR/versions/active.json                                                     {"version": "v2"}: the one served

Accepted versions stay on disk (at most ``--keep-versions`` of them), rejected ones are removed; every try is
recorded in ``versions/recalibrations.jsonl``. ``active.json`` (written atomically) names the version the
server loads at start and the one a hot swap installed last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lowbit.export.runtime import make_session
from lowbit.serve.shadow import DebugRunner, LayerProbe, ReferenceRunner, build_probes

log = logging.getLogger(__name__)

ORIGINAL = "v1"
REQUIRED_FILES = ("model_int8.onnx", "model_fp32.onnx", "recipe.yaml", "report.json")
_VERSION = re.compile(r"^v(\d+)$")


def version_dir(model_dir: Path, version: str) -> Path:
    """Folder holding ``version`` (``v1`` is ``DIR`` itself)."""
    if not _VERSION.match(version):
        raise ValueError(f"{model_dir}: bad model version {version!r} (expected v1, v2, ...)")
    return Path(model_dir) if version == ORIGINAL else Path(model_dir) / "versions" / version


def active_version(model_dir: Path) -> str:
    """The version named by ``DIR/versions/active.json`` (``v1`` when there is none)."""
    path = Path(model_dir) / "versions" / "active.json"
    if not path.is_file():
        return ORIGINAL
    try:
        version = json.loads(path.read_text())["version"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: malformed; expected {{\"version\": \"vN\"}}") from None
    if not version_dir(model_dir, version).is_dir():
        raise ValueError(f"{path}: names version {version!r}, whose folder is missing")
    return version


def set_active_version(model_dir: Path, version: str) -> None:
    """Write ``DIR/versions/active.json`` atomically."""
    folder = Path(model_dir) / "versions"
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "active.json", {"version": version})


def next_version(model_dir: Path) -> str:
    """The first unused ``vN``: N above every version on disk and every one in ``recalibrations.jsonl`` (removed
    versions included, so a number is never reused)."""
    folder = Path(model_dir) / "versions"
    numbers = [1]
    if folder.is_dir():
        numbers += [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.match(p.name))]
    history = folder / "recalibrations.jsonl"
    if history.is_file():
        for line in history.read_text().splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                if m := _VERSION.match(json.loads(line).get("version", "")):
                    numbers.append(int(m.group(1)))
    return f"v{max(numbers) + 1}"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def check_model_dir(model_dir: Path) -> None:
    """Fail in one line when ``DIR`` is not a ``lowbit quantize`` output folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {model_dir} lacks {', '.join(missing)} (write it with lowbit quantize)")


@dataclass
class ModelSet:
    """Everything that serves one version: plain sessions for the request path, the INT8 debug runner (request
    path of shadowed requests) and the FP32 reference runner (shadow thread).

    Never mutated after it is built: a hot swap replaces the whole set, and a request keeps the set it started
    with until it is answered.
    """

    version: str
    folder: Path
    int8: ort.InferenceSession
    fp32: ort.InferenceSession
    int8_debug: DebugRunner
    reference: ReferenceRunner
    probes: list[LayerProbe]
    input_name: str
    output_name: str
    sample_shape: tuple[int, ...]
    report: dict = field(default_factory=dict)

    @property
    def sample_numel(self) -> int:
        return int(np.prod(self.sample_shape))

    def run(self, precision: str, x: np.ndarray) -> np.ndarray:
        """First output of the plain ``precision`` session on ``x``."""
        session = self.int8 if precision == "int8" else self.fp32
        return session.run([self.output_name], {self.input_name: x})[0]


def _sample_shape(session: ort.InferenceSession, path: Path) -> tuple[int, ...]:
    inp = session.get_inputs()[0]
    if inp.type != "tensor(float)":
        raise ValueError(f"{path}: input {inp.name!r} has type {inp.type}; lowbit serve needs a float32 input")
    dims = inp.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"{path}: input {inp.name!r} has shape {inp.shape}; only the batch dim may be dynamic")
    return tuple(dims)


def sample_shape_of(path: Path) -> tuple[int, ...]:
    """Shape of one input row of the ONNX model at ``path`` (its input without the batch dim)."""
    return _sample_shape(make_session(path, 1), Path(path))


def load_model_set(model_dir: Path, version: str, threads: int) -> ModelSet:
    """Sessions of ``version`` of ``model_dir`` (see :func:`version_dir`)."""
    folder = version_dir(model_dir, version)
    check_model_dir(folder)
    int8_path, fp32_path = folder / "model_int8.onnx", folder / "model_fp32.onnx"
    int8, fp32 = make_session(int8_path, threads), make_session(fp32_path, threads)
    shape = _sample_shape(int8, int8_path)
    if _sample_shape(fp32, fp32_path) != shape:
        raise ValueError(f"{folder}: model_int8.onnx and model_fp32.onnx take inputs of different shapes")
    probes, int8_debug, reference = build_probes(onnx.load(str(int8_path)), onnx.load(str(fp32_path)), threads)
    try:
        report = json.loads((folder / "report.json").read_text())
    except ValueError:
        raise ValueError(f"{folder / 'report.json'}: malformed JSON") from None
    log.info("loaded %s (%s): %d quantized activations watched", folder, version, len(probes))
    return ModelSet(version, folder, int8, fp32, int8_debug, reference, probes, int8.get_inputs()[0].name,
                    int8.get_outputs()[0].name, shape, report)
