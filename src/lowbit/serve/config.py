"""Settings of the deployment guard: when a shadowed request counts as bad, and how the server behaves.

A shadowed request compares the INT8 output ``q`` with the FP32 output ``p`` of the same input and is *bad*
when any of these holds (see :func:`lowbit.serve.shadow.output_divergence` for the formulas):

* ``kl > kl_max``: mean over rows of KL(softmax(p) ‖ softmax(q)), nats
* ``sqnr_db < sqnr_min_db``: output SQNR ``10 · log10(Σ p² / Σ (p - q)²)``
* ``top1_mismatch > top1_mismatch_max``: share of rows whose argmax differs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

PRECISIONS = ("int8", "fp32")
_THRESHOLD_KEYS = {"kl": "kl_max", "sqnr_db": "sqnr_min_db", "top1_mismatch": "top1_mismatch_max"}


@dataclass(frozen=True)
class Threshold:
    """Limits a shadowed sample must respect to count as good.

    The defaults keep a healthy model quiet: EfficientNet-Lite0 INT8 (KL 0.03 nats, SQNR 15 dB on average) has
    1% of single images above KL 0.2 and none below 8 dB, so five bad samples in a row by chance are very
    unlikely, while a broken or clipping model is far beyond both (KL > 1, SQNR < 3 dB).

    Attributes:
        kl_max: largest tolerated mean KL(FP32 ‖ INT8) of the softmax outputs, nats.
        sqnr_min_db: smallest tolerated output SQNR in dB.
        top1_mismatch_max: largest tolerated share of rows whose argmax differs (0.5: a one-row request
            whose top-1 flips is bad; 1.0: never bad on this criterion).
    """

    kl_max: float = 0.2
    sqnr_min_db: float = 8.0
    top1_mismatch_max: float = 1.0

    def __post_init__(self) -> None:
        if not (self.kl_max >= 0 and not math.isnan(self.kl_max)):
            raise ValueError(f"threshold kl={self.kl_max}: must be >= 0")
        if math.isnan(self.sqnr_min_db):
            raise ValueError("threshold sqnr_db: must be a number")
        if not 0.0 <= self.top1_mismatch_max <= 1.0:
            raise ValueError(f"threshold top1_mismatch={self.top1_mismatch_max}: must be in [0, 1]")

    @classmethod
    def parse(cls, text: str | None) -> Threshold:
        """``"kl=0.05,sqnr_db=20,top1_mismatch=0.5"`` → Threshold (keys left out keep their defaults)."""
        if text is None or not text.strip():
            return cls()
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in _THRESHOLD_KEYS:
                raise ValueError(f"--threshold {text!r}: expected KEY=VALUE pairs with KEY in "
                                 f"{', '.join(_THRESHOLD_KEYS)}")
            try:
                values[_THRESHOLD_KEYS[key]] = float(raw)
            except ValueError:
                raise ValueError(f"--threshold {text!r}: {key}={raw.strip()!r} is not a number") from None
        return cls(**values)

    def to_dict(self) -> dict:
        return {key: getattr(self, attr) for key, attr in _THRESHOLD_KEYS.items()}


@dataclass(frozen=True)
class ServeConfig:
    """How ``lowbit serve`` serves one model folder.

    Attributes:
        model_dir: folder written by ``lowbit quantize`` (``model_int8.onnx``, ``model_fp32.onnx``, ...).
        shadow_rate: share of requests also run on the other precision, off the request path.
        max_bad: consecutive bad shadowed requests that switch serving to FP32.
        recover_good: consecutive good shadowed requests (while on FP32) that switch back to INT8.
        threshold: when a shadowed request is bad.
        precision: ``int8`` (guarded by the fuse) or ``fp32`` (always the float model).
        reservoir_size: recent input rows kept for re-calibration.
        max_batch: most rows one request may carry; the body limit follows from it.
        threads: ONNX Runtime intra-op threads per session.
        workers: threads running inference (and request decoding) for the event loop.
        shadow_queue: shadowed requests allowed to wait for the shadow thread; more are dropped (counted).
        min_recalibration_samples: reservoir rows ``POST /recalibrate`` needs.
        seed: seed of the request sampler (reproducible shadowing).
        admin_token: bearer token the admin endpoints (``POST /recalibrate``) require; None: they answer 403.
        keep_versions: re-calibrated versions kept on disk (the active one always); rejected ones are removed.
        trusted_data: ``.npy`` file of trusted input rows a new version must not be worse on (default: the
            quantize-time evaluation rows stored in the folder, ``trusted_inputs.npy``).
        read_timeout: seconds a client has to send a whole request (headers and body); then it is closed.
        max_connections: open connections (and running requests) beyond which requests get 503.
    """

    model_dir: Path
    shadow_rate: float = 0.05
    max_bad: int = 5
    recover_good: int = 20
    threshold: Threshold = field(default_factory=Threshold)
    precision: str = "int8"
    reservoir_size: int = 256
    max_batch: int = 32
    threads: int = 1
    workers: int = 2
    shadow_queue: int = 8
    min_recalibration_samples: int = 32
    seed: int = 0
    admin_token: str | None = field(default=None, repr=False)
    keep_versions: int = 5
    trusted_data: Path | None = None
    read_timeout: float = 10.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise ValueError(f"--shadow-rate {self.shadow_rate}: must be in [0, 1]")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        for f in fields(self):
            if f.name in ("max_bad", "recover_good", "reservoir_size", "max_batch", "threads", "workers",
                          "shadow_queue", "min_recalibration_samples", "keep_versions", "max_connections"):
                value = getattr(self, f.name)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: must be an integer >= 1")
        if not (isinstance(self.read_timeout, (int, float)) and 0 < self.read_timeout < math.inf):
            raise ValueError(f"--read-timeout {self.read_timeout!r}: must be a number of seconds > 0")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin token: must be at least 16 characters")
        if self.min_recalibration_samples > self.reservoir_size:
            raise ValueError(f"--min-recalibration-samples {self.min_recalibration_samples} exceeds "
                             f"--reservoir-size {self.reservoir_size}")
