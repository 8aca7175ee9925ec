"""Request and response bodies of ``POST /predict``.

Two encodings, chosen by the request's ``Content-Type``:

* ``application/json``: ``{"inputs": [...], "dtype": "float32"}``; ``inputs`` is a nested list of numbers of
  shape ``[N, *sample_shape]`` or ``sample_shape`` (one row); ``dtype`` is optional and must be ``float32``.
  Answer: ``{"outputs": [...], "shape": [...], "model": "int8" | "fp32", "version": "v1", "shadowed": false}``.
* ``application/octet-stream``: the raw little-endian float32 values in C order. Header ``X-Shape: N,1,8,8``
  (optional: without it N follows from the body length) and ``X-Dtype: float32`` (optional). Answer: the raw
  float32 output with headers ``X-Shape``, ``X-Dtype``, ``X-Lowbit-Model``, ``X-Lowbit-Version``,
  ``X-Lowbit-Shadowed``. A JSON request gets a raw answer with ``Accept: application/octet-stream``.

Only the model's first output is returned. Anything else is refused with a 4xx and ``{"error": "..."}``:
400 malformed body (JSON nested deeper than the parser allows included) or header (``X-Shape`` with more than
``MAX_DIMS`` dimensions included), 413 body or batch over the limit, 415 other content types, 422 wrong shape /
dtype, non-finite input values, or a model output that is not finite (finite but extreme inputs such as 3e38
can overflow inside the model; the answer is then an error, never ``NaN`` in the JSON). Error messages quote at
most ``MAX_QUOTE`` characters of any header or value the client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod

import numpy as np

JSON_BYTES_PER_VALUE = 24  # room for "-1.2345678901234567e-05, "
MIN_JSON_LIMIT = 64 * 1024
DRAIN_FACTOR = 4  # an oversized body up to this many times the limit is read and discarded before the 413
MAX_DIMS = 32  # numpy's limit on array dimensions
MAX_QUOTE = 64


def brief(text: str) -> str:
    """``repr(text)`` cut to ``MAX_QUOTE`` characters: a client value quoted in a message stays short."""
    r = repr(text)
    return r if len(r) <= MAX_QUOTE else f"{r[:MAX_QUOTE]}... ({len(text)} characters)"


class InputError(Exception):
    """A request the server refuses: HTTP ``status``, a metric ``reason`` and a one-line ``message``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class InputSpec:
    """What the served model takes."""

    sample_shape: tuple[int, ...]
    max_batch: int

    @property
    def sample_numel(self) -> int:
        return prod(self.sample_shape)

    def body_limit(self, kind: str | None) -> int:
        """Largest body accepted: ``max_batch`` rows of float32 (raw) or of JSON numbers."""
        raw = self.max_batch * self.sample_numel * 4
        return raw if kind != "json" else max(MIN_JSON_LIMIT, self.max_batch * self.sample_numel * JSON_BYTES_PER_VALUE)


def media_kind(content_type: str | None) -> str | None:
    """``"json"``, ``"raw"`` or None (unsupported) for a ``Content-Type`` header."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    return {"application/json": "json", "application/octet-stream": "raw"}.get(base)


def _shaped(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``x`` as ``[N, *sample_shape]`` float32 C-contiguous, or an InputError naming what is wrong."""
    if x.shape == spec.sample_shape:
        x = x[None]
    if x.shape[1:] != spec.sample_shape or x.ndim != len(spec.sample_shape) + 1:
        raise InputError(422, "wrong_shape", f"input has shape {list(x.shape)}; the model takes "
                         f"[N, {', '.join(map(str, spec.sample_shape))}] (or one row {list(spec.sample_shape)})")
    if x.shape[0] == 0:
        raise InputError(422, "wrong_shape", "input has no rows (N = 0)")
    if x.shape[0] > spec.max_batch:
        raise InputError(413, "too_large",
                         f"batch of {x.shape[0]} rows exceeds the limit of {spec.max_batch} (--max-batch)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(422, "non_finite", "input contains NaN or infinite values")
    return x


def decode_json(body: bytes, spec: InputSpec) -> np.ndarray:
    """Parse a JSON request body (see the module docstring)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(400, "malformed_json", f"malformed JSON body: {str(exc)[:120]}") from None
    except RecursionError:
        raise InputError(400, "malformed_json", "JSON body nested too deeply") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InputError(400, "malformed_json", 'JSON body must be an object with key "inputs"')
    dtype = payload.get("dtype", "float32")
    if dtype != "float32":
        raise InputError(422, "wrong_dtype", f"dtype {brief(str(dtype))}: the model takes float32")
    try:
        x = np.asarray(payload["inputs"])
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InputError(422, "wrong_shape", '"inputs" is ragged: every row must have the same shape') from None
    if x.dtype.kind not in "iuf":
        what = "booleans" if x.dtype.kind == "b" else "non-numbers (strings, objects or null)"
        raise InputError(422, "wrong_dtype", f'"inputs" holds {what}; the model takes float32 numbers')
    return _shaped(x, spec)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InputError(400, "bad_header",
                         f"X-Shape {brief(text)}: expected comma-separated integers like 4,1,8,8") from None
    if not dims or any(d < 0 for d in dims):
        raise InputError(400, "bad_header", f"X-Shape {brief(text)}: expected non-negative integers")
    if len(dims) > MAX_DIMS:
        raise InputError(400, "bad_header", f"X-Shape has {len(dims)} dimensions; at most {MAX_DIMS} are allowed")
    return dims


def decode_raw(body: bytes, shape_header: str | None, dtype_header: str | None, spec: InputSpec) -> np.ndarray:
    """Parse a raw float32 body with its optional ``X-Shape`` / ``X-Dtype`` headers."""
    dtype = (dtype_header or "float32").strip().lower()
    if dtype != "float32":
        raise InputError(422, "wrong_dtype", f"X-Dtype {brief(dtype)}: the model takes float32 (little-endian)")
    row_bytes = spec.sample_numel * 4
    if shape_header is None:
        if len(body) % row_bytes:
            raise InputError(422, "wrong_shape", f"body of {len(body)} bytes is not a whole number of rows of "
                             f"{row_bytes} bytes (float32 {list(spec.sample_shape)})")
        shape = (len(body) // row_bytes, *spec.sample_shape)
    else:
        shape = _parse_shape(shape_header)
        if prod(shape) * 4 != len(body):
            raise InputError(422, "wrong_shape", f"X-Shape {brief(shape_header)} needs {prod(shape) * 4} bytes of "
                             f"float32, the body has {len(body)}")
    return _shaped(np.frombuffer(body, dtype="<f4").reshape(shape), spec)


def check_output(output: np.ndarray) -> None:
    """InputError 422 when the model's answer holds NaN or infinity (inputs outside what the model handles)."""
    if not np.isfinite(output).all():
        raise InputError(422, "non_finite_output", "the model's output for this input is not finite (NaN or "
                         "infinity): the input values are outside the range the model handles")


def encode_json(output: np.ndarray, model: str, version: str, shadowed: bool) -> bytes:
    """The JSON answer (float32 values written exactly: ``float(np.float32)`` round-trips); always valid JSON."""
    check_output(output)
    return json.dumps({"outputs": output.tolist(), "shape": list(output.shape), "model": model,
                       "version": version, "shadowed": shadowed}, allow_nan=False).encode()


def encode_raw(output: np.ndarray, model: str, version: str, shadowed: bool) -> tuple[bytes, dict[str, str]]:
    """The raw answer and its headers (non-finite outputs refused as for JSON)."""
    check_output(output)
    headers = {"X-Shape": ",".join(map(str, output.shape)), "X-Dtype": "float32", "X-Lowbit-Model": model,
               "X-Lowbit-Version": version, "X-Lowbit-Shadowed": "1" if shadowed else "0"}
    return np.ascontiguousarray(output, dtype="<f4").tobytes(), headers
