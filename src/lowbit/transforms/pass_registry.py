"""The post-training passes, registered in one place: name → handler and the stage it runs in.

    prepare_ → [pre_calibration: cle] → calibrate → convert_ → [post_calibration: adaround | gptq → bias_correction]

Recipe validation (:class:`lowbit.transforms.recipe.Recipe`) and the pipeline (:mod:`lowbit.ptq.passes`) both
read this table; the order of :data:`PASS_REGISTRY` is the order passes run in, whatever order a recipe lists
them in, because each one needs what the previous produced: CLE changes float weights (before ranges are
measured), AdaRound / GPTQ round weights on the frozen grid, bias correction then removes the mean error that is
left. A handler is named ``"module:function"`` with the signature ``apply(model, forward_loop)``; it is imported
when the pass runs (the passes live in :mod:`lowbit.ptq`, above this package).

>>> ordered(["bias_correction", "gptq", "cle"])
['cle', 'gptq', 'bias_correction']
>>> PASS_REGISTRY["cle"].stage
'pre_calibration'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PRE_CALIBRATION = "pre_calibration"
POST_CALIBRATION = "post_calibration"


@dataclass(frozen=True)
class PassEntry:
    """One registered pass."""

    name: str
    stage: str  # PRE_CALIBRATION or POST_CALIBRATION
    handler: str  # "module:function", called as function(model, forward_loop)
    summary: str

    def load(self) -> Callable:
        module, _, function = self.handler.partition(":")
        return getattr(importlib.import_module(module), function)


PASS_REGISTRY: dict[str, PassEntry] = {e.name: e for e in (
    PassEntry("cle", PRE_CALIBRATION, "lowbit.ptq.cle:apply", "cross-layer equalization of Conv/Linear pairs"),
    PassEntry("adaround", POST_CALIBRATION, "lowbit.ptq.adaround:apply", "learned up/down rounding per layer"),
    PassEntry("gptq", POST_CALIBRATION, "lowbit.ptq.gptq:apply", "rounding with least-squares error compensation"),
    PassEntry("bias_correction", POST_CALIBRATION, "lowbit.ptq.bias_correction:apply",
              "shifts each bias by the mean output error"),
)}
EXCLUSIVE: tuple[tuple[str, str], ...] = (("adaround", "gptq"),)  # both choose the weight rounding


def check_passes(passes: Iterable[str], brief: Callable[[object], str] = repr) -> None:
    """Refuse unknown names, a pass named twice and two passes that exclude each other (``ValueError``)."""
    passes = list(passes)
    bad = [p for p in passes if p not in PASS_REGISTRY]
    if bad:
        raise ValueError(f"unknown pass {brief(bad[0])}; known passes: {', '.join(PASS_REGISTRY)}")
    for a, b in EXCLUSIVE:
        if a in passes and b in passes:
            raise ValueError(f"passes {a} and {b} both choose the weight rounding; name only one")
    if len(set(passes)) != len(passes):
        raise ValueError(f"a pass is named twice in {brief(passes)}")


def ordered(passes: Iterable[str], stage: str | None = None) -> list[str]:
    """The named passes in pipeline order (only those of ``stage`` when given), after :func:`check_passes`."""
    passes = list(passes)
    check_passes(passes)
    return [p for p, e in PASS_REGISTRY.items() if p in passes and (stage is None or e.stage == stage)]
