"""Label-free QAT: the FP32 model teaches its quantized copy.

* ``kl``: ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` on logits, averaged over the rows (Hinton et al.);
* ``mse``: ``mean((e_s − e_t)²)`` on embeddings (any output shape).

``z_t`` / ``e_t`` are the teacher's (FP32) outputs, ``z_s`` / ``e_s`` the student's (the QAT model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def kl_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · mean_rows Σ p_t (log p_t − log p_s)`` with ``p = softmax(z / T)`` along the last dim."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature!r}")
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.detach() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean() * temperature**2


def mse_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``mean((e_s − e_t)²)`` (``temperature`` is accepted for a uniform signature and ignored)."""
    if student.shape != teacher.shape:
        raise ValueError(f"embedding distillation: student shape {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
    return F.mse_loss(student, teacher.detach())


DISTILL_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"kl": kl_distill_loss, "mse": mse_distill_loss}


def distill_loss(kind: str) -> Callable[..., torch.Tensor]:
    """The loss named ``kind`` (``kl`` or ``mse``)."""
    try:
        return DISTILL_LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown distillation loss {kind!r}; use one of {', '.join(DISTILL_LOSSES)}") from None
