"""The HTTP application (Starlette, run by uvicorn).

| route | answer |
|---|---|
| ``POST /predict`` | the served model's first output (body formats: :mod:`lowbit.serve.codec`) |
| ``GET /health`` | serving precision, fuse state, version, shadow and reservoir counts (JSON) |
| ``GET /metrics`` | Prometheus text format (:mod:`lowbit.serve.metrics`) |
| ``POST /recalibrate`` | admin: re-calibrate on the reservoir; hot-swap if better (:mod:`lowbit.serve.recalibrate`) |

Admin endpoints need ``Authorization: Bearer <token>`` (``--admin-token-file`` or ``LOWBIT_ADMIN_TOKEN``):
401 with a missing or wrong token, 403 when the server has no token configured. Every refused request gets a
4xx JSON ``{"error": ...}`` and one log line; every answer is valid JSON (non-finite numbers in a report are
written as the strings ``"inf"``, ``"-inf"``, ``"nan"``).

Inference, body decoding and re-calibration run in thread pools, never on the event loop, so a slow request,
a shadow comparison or a re-calibration does not hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from lowbit.serve.codec import (
    DRAIN_FACTOR,
    InputError,
    InputSpec,
    brief,
    decode_json,
    decode_raw,
    encode_json,
    encode_raw,
    media_kind,
)
from lowbit.serve.config import ServeConfig
from lowbit.serve.engine import Engine, Prediction
from lowbit.serve.models import active_version, load_model_set
from lowbit.serve.recalibrate import ModelLoader, RecalibrationBusy, recalibrate
from lowbit.serve.versions import clean_stale_versions

log = logging.getLogger(__name__)


def _finite(obj):
    """``obj`` with every non-finite float replaced by ``"inf"`` / ``"-inf"`` / ``"nan"`` (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_response(obj, status_code: int = 200, headers: dict | None = None) -> Response:
    """A JSON response that is valid JSON whatever floats ``obj`` holds."""
    return Response(json.dumps(_finite(obj), allow_nan=False, default=str), status_code=status_code,
                    media_type="application/json", headers=headers)


def refuse(request: Request, status: int, message: str, headers: dict | None = None) -> Response:
    """A 4xx ``{"error": message}``, logged in one line."""
    client = request.client.host if request.client else "?"
    log.warning("%s %s from %s: %d %s", request.method, request.url.path, client, status, message[:200])
    return json_response({"error": message}, status, headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 InputError past ``limit`` bytes.

    A body over the limit is still read (and discarded) up to ``DRAIN_FACTOR · limit`` bytes, so the client
    can read the 413 instead of a reset connection; a larger declared ``Content-Length`` is refused unread.
    """
    declared = request.headers.get("content-length")
    if declared is not None and not declared.strip().isdigit():
        raise InputError(400, "bad_header", f"Content-Length {brief(declared)} is not a number")
    if declared is not None and int(declared) > DRAIN_FACTOR * limit:
        raise InputError(413, "too_large", f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total <= limit:
                chunks.append(chunk)
            elif total > DRAIN_FACTOR * limit:
                break
    except ClientDisconnect:
        raise InputError(400, "disconnected", "the client closed the connection before the body was read") from None
    if total > limit:
        raise InputError(413, "too_large", f"body of {total} bytes exceeds the limit of {limit} bytes")
    return b"".join(chunks)


class ServeApp:
    """Routes and shared state of one server."""

    def __init__(self, config: ServeConfig, loader: ModelLoader | None = None) -> None:
        self.config = config
        self.loader = loader
        clean_stale_versions(config.model_dir)
        self.engine = Engine(config, load_model_set(config.model_dir, active_version(config.model_dir), config.threads))
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="lowbit-infer")
        self.recal_pool = ThreadPoolExecutor(1, thread_name_prefix="lowbit-recalibrate")
        self.recal_lock = asyncio.Lock()
        routes = [Route("/predict", self.predict, methods=["POST"]), Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"]),
                  Route("/recalibrate", self.recalibrate, methods=["POST"])]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        yield
        self.close()

    def close(self) -> None:
        """Stop the thread pools: running work finishes, shadow comparisons still queued are dropped."""
        self.pool.shutdown(wait=True)
        self.recal_pool.shutdown(wait=True)
        self.engine.close()

    def _spec(self) -> InputSpec:
        return InputSpec(self.engine.models.sample_shape, self.config.max_batch)

    def _decode_and_predict(self, body: bytes, kind: str, shape: str | None, dtype: str | None,
                            spec: InputSpec) -> Prediction:
        x = decode_json(body, spec) if kind == "json" else decode_raw(body, shape, dtype, spec)
        return self.engine.predict(x)

    async def predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        spec = self._spec()
        kind = media_kind(request.headers.get("content-type"))
        try:
            body = await read_body(request, spec.body_limit(kind))
            if kind is None:
                raise InputError(415, "unsupported_media_type",
                                 f"Content-Type {brief(request.headers.get('content-type', ''))}: "
                                 "send application/json or application/octet-stream")
            pred = await loop.run_in_executor(self.pool, self._decode_and_predict, body, kind,
                                              request.headers.get("x-shape"), request.headers.get("x-dtype"), spec)
            if kind == "raw" or "application/octet-stream" in request.headers.get("accept", ""):
                content, headers = encode_raw(pred.output, pred.precision, pred.version, pred.shadowed)
                response = Response(content, media_type="application/octet-stream", headers=headers)
            else:
                response = Response(encode_json(pred.output, pred.precision, pred.version, pred.shadowed),
                                    media_type="application/json")
        except InputError as exc:
            self.engine.metrics.rejected.labels(reason=exc.reason).inc()
            return refuse(request, exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 — answer 500 with the cause, keep serving
            log.exception("prediction failed")
            self.engine.metrics.errors.inc()
            return json_response({"error": f"prediction failed: {type(exc).__name__}"}, 500)
        self.engine.metrics.latency.labels(model=pred.precision).observe(time.perf_counter() - t0)
        self.engine.metrics.requests.labels(model=pred.precision).inc()
        return response

    async def health(self, _request: Request) -> Response:
        out = self.engine.health()
        out["recalibrating"] = self.recal_lock.locked()
        return json_response(out)

    async def metrics(self, _request: Request) -> Response:
        content, content_type = self.engine.metrics.render()
        return Response(content, headers={"Content-Type": content_type})

    def _recalibrate_and_swap(self) -> dict:
        cfg = self.config
        result = recalibrate(cfg.model_dir, self.engine.reservoir.snapshot(), self.loader, data_label="reservoir",
                             threads=cfg.threads, trusted=cfg.trusted_data, keep_versions=cfg.keep_versions)
        if result.accepted:
            self.engine.swap(load_model_set(cfg.model_dir, result.version, cfg.threads))
        self.engine.metrics.recalibrations.labels(result="accepted" if result.accepted else "rejected").inc()
        return result.to_dict()

    def _authorize(self, request: Request) -> Response | None:
        """None when the request carries the admin token, else the 401 / 403 to answer."""
        token = self.config.admin_token
        if token is None:
            return refuse(request, 403, "admin endpoints are off: start the server with --admin-token-file PATH "
                          "or LOWBIT_ADMIN_TOKEN to enable them")
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
            return refuse(request, 401, "admin endpoint: send 'Authorization: Bearer <token>'",
                          {"WWW-Authenticate": "Bearer"})
        return None

    async def recalibrate(self, request: Request) -> Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        if self.loader is None:
            return refuse(request, 409, "re-calibration is off: this server was started without a float model loader")
        if self.recal_lock.locked():
            return refuse(request, 409, "a re-calibration is already running")
        rows, need = len(self.engine.reservoir), self.config.min_recalibration_samples
        if rows < need:
            return refuse(request, 409, f"the reservoir holds {rows} input rows; re-calibration needs at least "
                          f"{need} (--min-recalibration-samples)")
        async with self.recal_lock:
            try:
                out = await asyncio.get_running_loop().run_in_executor(self.recal_pool, self._recalibrate_and_swap)
            except RecalibrationBusy as exc:
                return refuse(request, 409, str(exc))
            except ValueError as exc:  # the inputs or the folder cannot make a version: say why, keep serving
                self.engine.metrics.recalibrations.labels(result="failed").inc()
                return refuse(request, 422, f"re-calibration failed: {str(exc)[:300]}")
            except Exception as exc:  # noqa: BLE001 — report the cause, keep serving the current model
                log.exception("re-calibration failed")
                self.engine.metrics.recalibrations.labels(result="failed").inc()
                return json_response({"error": f"re-calibration failed: {type(exc).__name__}: {str(exc)[:300]}"},
                                     500)
        return json_response(out)


def create_app(config: ServeConfig, loader: ModelLoader | None = None) -> ServeApp:
    """The application for ``config``; ``loader`` rebuilds the float model for ``POST /recalibrate``."""
    return ServeApp(config, loader)
