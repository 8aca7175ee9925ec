"""Built-in models and data sets that work offline, from installed packages only.

Models (:data:`MODEL_NAMES`):

* ``"efficientnet-lite0"``: pretrained ImageNet EfficientNet-Lite0
  (:mod:`lowbit.zoo.efficientnet`), default data ``"photos"``.
* ``"digits-cnn"``: a small residual CNN trained on scikit-learn's digits
  (:mod:`lowbit.zoo.digits`), default data ``"digits"``.
* ``"minilm-l6"``: the sentence-transformers all-MiniLM-L6-v2 encoder with mean
  pooling (:mod:`lowbit.zoo.minilm`), default data ``"sentences"``; input: int64
  token ids ``[N, 64]``, output: unit sentence embeddings.

Reference zoo (:data:`REFERENCE_ZOO`, also in :data:`MODEL_NAMES`): random-initialised models at real
layer shapes built offline from ``transformers`` configurations or plain ``torch.nn``
(:mod:`lowbit.zoo.archs`, :mod:`lowbit.zoo.blocks`): ``resnet18``, ``convnext-atto``, ``mobilenet-v2``,
``mobilevit-xxs``, ``efficientnet-b0``, ``regnetx-200mf``, ``vit-tiny``, ``swin-tiny`` (images
``[N, 3, 224, 224]``, default data ``"photos"``), ``bert-mini``, ``gpt2-small`` (token ids ``[N, 64]``,
default data ``"sentences"``), and the blocks ``silu-hardswish-cnn``, ``unet-tiny`` (photos) and
``lstm-tagger`` (sentences). Their weights are random: metrics compare INT8 with FP32, never with labels.

Data sets (:data:`DATA_NAMES`):

* ``"photos"``: augmented views of real photos bundled with scikit-image and
  scikit-learn (:mod:`lowbit.zoo.photos`); calib and eval views come from
  disjoint photos; no labels (the metric is agreement with the FP32 model).
* ``"digits"``: the calib and test subsets of scikit-learn's digits, with
  labels.
* ``"sentences"``: English sentences from ``pydoc_data.topics``
  (:mod:`lowbit.zoo.sentences`), tokenized for ``minilm-l6``; calib and eval
  sentences are disjoint; no labels (metric: embeddings vs FP32).

Importing this package is cheap: heavy modules are imported on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

REFERENCE_ZOO = (
    "resnet18", "convnext-atto", "mobilenet-v2", "mobilevit-xxs", "efficientnet-b0", "regnetx-200mf",
    "vit-tiny", "swin-tiny", "bert-mini", "gpt2-small", "silu-hardswish-cnn", "unet-tiny", "lstm-tagger",
)  # kept literal so that importing lowbit.zoo stays cheap; lowbit.zoo.archs.REFERENCE_ZOO must match
MODEL_NAMES = ("efficientnet-lite0", "digits-cnn", "minilm-l6", *REFERENCE_ZOO)
DATA_NAMES = ("photos", "digits", "sentences")
PHOTOS_N_CALIB = 64
PHOTOS_N_EVAL = 256

__all__ = [
    "DATA_NAMES",
    "MODEL_NAMES",
    "REFERENCE_ZOO",
    "ZooData",
    "ZooModel",
    "load_data",
    "load_model",
]


@dataclass(frozen=True)
class ZooData:
    """Calibration and evaluation inputs for a zoo model.

    Attributes:
        name: Data set name (one of :data:`DATA_NAMES`).
        calib: Calibration inputs ``[N, ...]`` float32, ready for the model.
        eval_inputs: Evaluation inputs, disjoint from ``calib``.
        eval_labels: ``int64`` labels of ``eval_inputs``, or ``None`` when the
            metric is agreement with the FP32 model.
    """

    name: str
    calib: torch.Tensor
    eval_inputs: torch.Tensor
    eval_labels: torch.Tensor | None


@dataclass(frozen=True)
class ZooModel:
    """A float model from the zoo.

    Attributes:
        name: Model name (one of :data:`MODEL_NAMES`).
        model: The float model, in eval mode.
        example_input: A batch of one valid input.
        default_data: Name of the matching data set in :data:`DATA_NAMES`.
    """

    name: str
    model: torch.nn.Module
    example_input: torch.Tensor
    default_data: str


def _unknown(kind: str, name: object, valid: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


def load_model(name: str) -> ZooModel:
    """Load a zoo model by name.

    Args:
        name: One of :data:`MODEL_NAMES`.

    Returns:
        The :class:`ZooModel` (model in eval mode).

    Raises:
        ValueError: If ``name`` is not a zoo model.
    """
    if name == "efficientnet-lite0":
        from lowbit.zoo.efficientnet import load_efficientnet_lite0
        from lowbit.zoo.photos import photo_views

        model = load_efficientnet_lite0()
        example = photo_views("calib", 1, seed=0)
        return ZooModel(name, model, example, default_data="photos")
    if name == "digits-cnn":
        from lowbit.zoo.digits import load_digits_cnn, load_digits_split

        model = load_digits_cnn()
        example = load_digits_split().x_calib[:1].clone()
        return ZooModel(name, model, example, default_data="digits")
    if name == "minilm-l6":
        from lowbit.zoo.minilm import load_minilm, tokenize
        from lowbit.zoo.sentences import SEQ_LEN, sentence_split

        example = tokenize(sentence_split(1, 1)[0], SEQ_LEN)
        return ZooModel(name, load_minilm(), example, default_data="sentences")
    if name in REFERENCE_ZOO:
        from lowbit.zoo.archs import ARCHS, build

        model, example = build(name)
        return ZooModel(name, model, example, default_data=ARCHS[name].data)
    raise _unknown("model", name, MODEL_NAMES)


def _check_count(label: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{label} must be a positive integer or None, got {value!r}")


def load_data(
    name: str, n_calib: int | None = None, n_eval: int | None = None, seed: int = 0
) -> ZooData:
    """Load a zoo data set by name.

    Args:
        name: One of :data:`DATA_NAMES`.
        n_calib: Number of calibration samples. ``None`` means the default:
            64 views for ``"photos"``, the whole calib split for ``"digits"``.
        n_eval: Number of evaluation samples. ``None`` means the default: 256
            views for ``"photos"``, the whole test split for ``"digits"``.
        seed: For ``"photos"``, the seed of the crop/flip stream. For
            ``"digits"`` the split is fixed and ``seed`` picks which samples
            are kept when ``n_calib``/``n_eval`` ask for fewer than available
            (``seed=0`` keeps the first ones).

    Returns:
        The :class:`ZooData`.

    Raises:
        ValueError: If ``name`` is unknown, or a count is not positive or
            exceeds the size of a digits split.
    """
    _check_count("n_calib", n_calib)
    _check_count("n_eval", n_eval)
    if name == "photos":
        from lowbit.zoo.photos import photo_views

        calib = photo_views("calib", n_calib or PHOTOS_N_CALIB, seed=seed)
        eval_inputs = photo_views("eval", n_eval or PHOTOS_N_EVAL, seed=seed)
        return ZooData(name, calib, eval_inputs, None)
    if name == "digits":
        return _digits_data(n_calib, n_eval, seed)
    if name == "sentences":
        from lowbit.zoo.sentences import load_sentences

        calib, eval_inputs = load_sentences(n_calib, n_eval, seed)
        return ZooData(name, calib, eval_inputs, None)
    raise _unknown("data set", name, DATA_NAMES)


def _subset(x: torch.Tensor, n: int | None, seed: int, label: str) -> torch.Tensor:
    """Return a copy of ``x`` restricted to ``n`` rows (``seed`` 0: the first rows)."""
    import torch

    if n is None:
        return x.clone()
    if n > len(x):
        raise ValueError(f"{label}={n} exceeds the {len(x)} available digits samples")
    if seed == 0:
        return x[:n].clone()
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[rows.sort().values].clone()


def _digits_data(n_calib: int | None, n_eval: int | None, seed: int) -> ZooData:
    from lowbit.zoo.digits import load_digits_split

    split = load_digits_split()
    calib = _subset(split.x_calib, n_calib, seed, "n_calib")
    eval_inputs = _subset(split.x_test, n_eval, seed, "n_eval")
    eval_labels = _subset(split.y_test, n_eval, seed, "n_eval")
    return ZooData("digits", calib, eval_inputs, eval_labels)
