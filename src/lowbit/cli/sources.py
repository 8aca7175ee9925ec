"""Where the CLI gets its model, data and evaluation function from.

Model ``M``: a zoo name (``efficientnet-lite0``, ``digits-cnn``) or ``package.module:callable`` returning an
``nn.Module`` (or a ``(module, example_input)`` pair). Data ``D``: a zoo data name (``photos``,
``digits``), a folder of images, or a ``.npy`` / ``.pt`` tensor file of inputs ``[N, ...]``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from lowbit import zoo
from lowbit.data import StreamedInputs
from lowbit.observers import OBSERVERS
from lowbit.report.evaluate import EvalFn, EvalSet
from lowbit.report.token_models import EMBEDDING_METRIC
from lowbit.transforms.recipe import PRESETS
from lowbit.zoo import DATA_NAMES, MODEL_NAMES
from lowbit.zoo.efficientnet import MEAN_RGB, STD_RGB

log = logging.getLogger(__name__)

MAX_STREAMED_EVAL = 1024  # samples of a streamed folder / .npy evaluated by default (ONNX Runtime runs them all)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class SourceError(ValueError):
    """A model, data or eval source the CLI cannot use (the message names it)."""


@dataclass
class ModelSource:
    name: str
    model: nn.Module
    example_input: torch.Tensor
    zoo_name: str | None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"3x224x224"`` → a shape with a batch dim of 1."""
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise SourceError(f"--input-shape {text!r}: expected integers like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise SourceError(f"--input-shape {text!r}: dimensions must be positive")
    return dims if len(dims) >= 2 and dims[0] == 1 else (1, *dims)


def _import_callable(spec: str, what: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SourceError(f"{what} {spec!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 — any import failure is reported in one line
        raise SourceError(f"cannot load {what} {spec!r}: {type(exc).__name__}: {exc}") from None


def load_model_source(spec: str, input_shape: str | None) -> ModelSource:
    """Resolve ``--model`` (and ``--input-shape``) into a float eval-mode model and an example input."""
    if spec in zoo.MODEL_NAMES:
        zm = zoo.load_model(spec)
        return ModelSource(spec, zm.model, zm.example_input, spec)
    if ":" not in spec:
        raise SourceError(f"model {spec!r} is neither a zoo model ({', '.join(zoo.MODEL_NAMES)}) nor 'module:callable'")
    factory = _import_callable(spec, "model")
    try:
        made = factory()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 — sys.exit() in a model factory is a failure too
        raise SourceError(f"model {spec!r} failed to build: {type(exc).__name__}: {exc}") from None
    model, example = (made if isinstance(made, tuple) else (made, None))
    if not isinstance(model, nn.Module):
        raise SourceError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if input_shape is not None:
        example = torch.randn(parse_shape(input_shape))
    if example is None:
        raise SourceError(f"model {spec!r} gives no example input: pass --input-shape")
    check_forward(spec, model.eval(), example)
    return ModelSource(spec, model, example, None)


def check_forward(spec: str, model: nn.Module, example: torch.Tensor) -> None:
    """Fail early, in one line, when the model cannot run its example input."""
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SourceError(f"model {spec!r} fails on an input of shape {tuple(example.shape)}: {type(exc).__name__}: {first}") from None


def _load_image(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _normalise(x: torch.Tensor, zoo_name: str | None) -> torch.Tensor:
    """``[N, H, W, 3]`` pixels in [0, 1] → the model's ``[N, 3, H, W]`` input (EfficientNet-Lite0's own scaling)."""
    x = x.permute(0, 3, 1, 2).contiguous()
    if zoo_name == "efficientnet-lite0":
        mean = torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
        std = torch.tensor(STD_RGB).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


class ImageFolderInputs(StreamedInputs):
    """The images of a folder, read and resized when a batch is drawn (DataLoader workers with ``--workers``).

    Files that do not open as images are found when they are read: a batch drops them and the count is logged
    (by the process that read them).
    """

    def __init__(self, files: list[Path], size: tuple[int, int], zoo_name: str | None, batch_size: int = 32,
                 workers: int = 0) -> None:
        super().__init__(len(files), (3, *size), batch_size, workers)
        self.files, self.size, self.zoo_name = files, size, zoo_name

    def load(self, indices: list[int]) -> torch.Tensor:
        arrays = [_load_image(self.files[i], self.size) for i in indices]
        kept = [a for a in arrays if a is not None]
        if len(kept) < len(arrays):
            log.warning("data folder: skipped %d of %d files in a batch (corrupt images)", len(arrays) - len(kept),
                        len(arrays))
        if not kept:
            return torch.empty(0, *self.sample_shape)
        return _normalise(torch.from_numpy(np.stack(kept)), self.zoo_name)


def load_image_folder(folder: Path, example: torch.Tensor, zoo_name: str | None, workers: int = 0) -> ImageFolderInputs:
    """The images of a folder, resized to the model's input, streamed (never all in memory); files without an
    image suffix are skipped and counted, corrupt images are skipped when read.

    Pixels are scaled to [0, 1]; for the zoo's EfficientNet-Lite0 its own ``(pixel - 127) / 128`` is applied.
    """
    if example.ndim != 4 or example.shape[1] != 3:
        raise SourceError(f"data folder {folder}: images need a model input of shape [N, 3, H, W], got {tuple(example.shape)}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and _has_image_header(p)]
    if not images:
        raise SourceError(f"data folder {folder}: no readable image among {len(files)} files")
    skipped = len(files) - len(images)
    if skipped:
        log.warning("data folder %s: skipped %d of %d files (not images or corrupt)", folder, skipped, len(files))
    return ImageFolderInputs(images, tuple(example.shape[2:]), zoo_name, workers=workers)


def _has_image_header(path: Path) -> bool:
    """True when PIL recognises the file's header (cheap: the pixels are decoded only when a batch is read)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False


class NpyInputs(StreamedInputs):
    """A ``.npy`` file of inputs ``[N, ...]`` opened memory-mapped: only the batches drawn are read."""

    def __init__(self, path: Path, array: np.ndarray, batch_size: int = 32, workers: int = 0) -> None:
        super().__init__(int(array.shape[0]), tuple(array.shape[1:]), batch_size, workers)
        self.path, self.array = path, array

    def load(self, indices: list[int]) -> torch.Tensor:
        if not indices:
            return torch.empty(0, *self.sample_shape)
        lo, hi = min(indices), max(indices) + 1
        block = self.array[lo:hi] if hi - lo == len(indices) and indices == list(range(lo, hi)) else self.array[indices]
        return torch.from_numpy(np.array(block, dtype=np.float32, copy=True))  # a copy, never a view of the map

    def __getstate__(self) -> dict:  # DataLoader workers re-open the file instead of pickling the map
        state = dict(self.__dict__)
        state["array"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)


def load_tensor_file(path: Path, workers: int = 0) -> torch.Tensor | NpyInputs:
    """A ``.npy`` file (memory-mapped, streamed: :class:`NpyInputs`) or a ``.pt`` tensor
    (``torch.load(weights_only=True)``, read whole) of inputs."""
    try:
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.ndim < 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                raise ValueError(f"expected a numeric array [N, ...], got dtype {array.dtype} and {array.ndim} dims")
            return NpyInputs(path, array, workers=workers)
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"data file {path}: cannot read it: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, torch.Tensor):
        raise SourceError(f"data file {path}: expected one tensor, got {type(data).__name__}")
    return data.float()


def load_data_source(spec: str, model: ModelSource, n_calib: int | None, n_eval: int | None,
                     workers: int = 0) -> tuple[torch.Tensor | StreamedInputs, EvalSet]:
    """Resolve ``--data`` into calibration inputs and the evaluation set.

    A folder or a ``.npy`` file is streamed: the calibration inputs are a :class:`StreamedInputs` read batch by
    batch (``workers`` DataLoader processes); the evaluation set is read into memory, at most
    ``MAX_STREAMED_EVAL`` samples unless ``--n-eval`` says otherwise.
    """
    if spec in zoo.DATA_NAMES:
        zd = zoo.load_data(spec, n_calib=n_calib, n_eval=n_eval)
        metric = "accuracy" if zd.eval_labels is not None else "top1_agreement"
        if spec == "sentences":  # unit sentence embeddings: cosine / nearest-neighbour agreement with FP32
            metric = EMBEDDING_METRIC
        calib, ev = zd.calib, EvalSet(zd.eval_inputs, zd.eval_labels, metric_name=metric, note=f"zoo data '{spec}'")
    else:
        path = Path(spec)
        if path.is_dir():
            x = load_image_folder(path, model.example_input, model.zoo_name, workers)
        elif path.is_file() and path.suffix in (".npy", ".pt"):
            x = load_tensor_file(path, workers)
        else:
            raise SourceError(f"data {spec!r} is not a zoo data set ({', '.join(zoo.DATA_NAMES)}), a folder, or a .npy/.pt file")
        calib = x[:n_calib] if n_calib else x
        ev = EvalSet(_eval_inputs(spec, x, n_eval), note="evaluated on the calibration data (no held-out set given)")
    check_shapes(spec, calib, model)
    return calib, ev


def _eval_inputs(spec: str, x: torch.Tensor | StreamedInputs, n_eval: int | None) -> torch.Tensor:
    """The first ``n_eval`` inputs (all of a tensor; at most ``MAX_STREAMED_EVAL`` of streamed data), in memory."""
    if n_eval:
        x = x[:n_eval]
    elif isinstance(x, StreamedInputs) and len(x) > MAX_STREAMED_EVAL:
        log.warning("data %s: evaluating on its first %d of %d samples (pass --n-eval for more)", spec,
                    MAX_STREAMED_EVAL, len(x))
        x = x[:MAX_STREAMED_EVAL]
    return x.materialize() if isinstance(x, StreamedInputs) else x


def check_shapes(spec: str, data: torch.Tensor | StreamedInputs, model: ModelSource) -> None:
    """Fail early with one line when the data's sample shape does not fit the model's input."""
    want = tuple(model.example_input.shape[1:])
    got = tuple(data.shape[1:])
    if got != want:
        raise SourceError(f"data {spec!r} has samples of shape {got}, model {model.name!r} expects {want}")


def load_eval_fn(spec: str | None) -> EvalFn | None:
    """``--eval module:function``; the function receives ``predict(x) -> logits`` and returns a float."""
    return None if spec is None else _import_callable(spec, "eval function")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--workers``: where a job computes and how its data is read."""
    p.add_argument("--device", default="cpu", metavar="{cpu,cuda,auto}",
                   help="where calibration, passes, analysis and training run: cpu (default), cuda (or cuda:N), or "
                        "auto (cuda when available); export and ONNX Runtime always run on the CPU")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes reading an image folder or .npy file (default 0: in-process)")


def add_source_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--data``, ``--recipe``, ``--calibrator``, ``--device`` and ``--workers``, as every job
    command takes them."""
    p.add_argument("--model", required=True, help=f"zoo name ({', '.join(MODEL_NAMES)}) or package.module:callable")
    p.add_argument("--data", required=True, help=f"zoo data ({', '.join(DATA_NAMES)}), an image folder, or a .npy/.pt file")
    p.add_argument("--recipe", default="int8", help=f"preset ({', '.join(PRESETS)}) or a YAML recipe file")
    p.add_argument("--calibrator", default=None, choices=sorted(OBSERVERS), help="activation calibrator (overrides the recipe)")
    add_device_args(p)
