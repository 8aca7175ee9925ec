"""The HTTP application (Starlette, run by uvicorn).

| route | answer |
|---|---|
| ``POST /predict`` | the served model's first output (body formats: :mod:`lowbit.serve.codec`) |
| ``GET /health`` | serving precision, fuse state, version, shadow and reservoir counts (JSON) |
| ``GET /metrics`` | Prometheus text format (:mod:`lowbit.serve.metrics`) |
| ``POST /recalibrate`` | re-calibrate on the reservoir; hot-swap if better (:mod:`lowbit.serve.recalibrate`) |

Inference, body decoding and re-calibration run in thread pools, never on the event loop, so a slow request,
a shadow comparison or a re-calibration does not hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lowbit.serve.codec import (
    DRAIN_FACTOR,
    InputError,
    InputSpec,
    decode_json,
    decode_raw,
    encode_json,
    encode_raw,
    media_kind,
)
from lowbit.serve.config import ServeConfig
from lowbit.serve.engine import Engine, Prediction
from lowbit.serve.models import active_version, load_model_set
from lowbit.serve.recalibrate import ModelLoader, recalibrate

log = logging.getLogger(__name__)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 InputError past ``limit`` bytes.

    A body over the limit is still read (and discarded) up to ``DRAIN_FACTOR · limit`` bytes, so the client
    can read the 413 instead of a reset connection; a larger declared ``Content-Length`` is refused unread.
    """
    declared = request.headers.get("content-length")
    if declared is not None and not declared.strip().isdigit():
        raise InputError(400, "bad_header", f"Content-Length {declared!r} is not a number")
    if declared is not None and int(declared) > DRAIN_FACTOR * limit:
        raise InputError(413, "too_large", f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            chunks.append(chunk)
        elif total > DRAIN_FACTOR * limit:
            break
    if total > limit:
        raise InputError(413, "too_large", f"body of {total} bytes exceeds the limit of {limit} bytes")
    return b"".join(chunks)


class ServeApp:
    """Routes and shared state of one server."""

    def __init__(self, config: ServeConfig, loader: ModelLoader | None = None) -> None:
        self.config = config
        self.loader = loader
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
                                 f"Content-Type {request.headers.get('content-type')!r}: "
                                 "send application/json or application/octet-stream")
            pred = await loop.run_in_executor(self.pool, self._decode_and_predict, body, kind,
                                              request.headers.get("x-shape"), request.headers.get("x-dtype"), spec)
        except InputError as exc:
            self.engine.metrics.rejected.labels(reason=exc.reason).inc()
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        except Exception as exc:  # noqa: BLE001 — answer 500 with the cause, keep serving
            log.exception("prediction failed")
            self.engine.metrics.errors.inc()
            return JSONResponse({"error": f"prediction failed: {type(exc).__name__}: {exc}"}, status_code=500)
        if kind == "raw" or "application/octet-stream" in request.headers.get("accept", ""):
            content, headers = encode_raw(pred.output, pred.precision, pred.version, pred.shadowed)
            response = Response(content, media_type="application/octet-stream", headers=headers)
        else:
            content = encode_json(pred.output, pred.precision, pred.version, pred.shadowed)
            response = Response(content, media_type="application/json")
        self.engine.metrics.latency.labels(model=pred.precision).observe(time.perf_counter() - t0)
        self.engine.metrics.requests.labels(model=pred.precision).inc()
        return response

    async def health(self, _request: Request) -> Response:
        out = self.engine.health()
        out["recalibrating"] = self.recal_lock.locked()
        return JSONResponse(out)

    async def metrics(self, _request: Request) -> Response:
        content, content_type = self.engine.metrics.render()
        return Response(content, headers={"Content-Type": content_type})

    def _recalibrate_and_swap(self) -> dict:
        result = recalibrate(self.config.model_dir, self.engine.reservoir.snapshot(), self.loader,
                             data_label="reservoir", threads=self.config.threads)
        if result.accepted:
            self.engine.swap(load_model_set(self.config.model_dir, result.version, self.config.threads))
        self.engine.metrics.recalibrations.labels(result="accepted" if result.accepted else "rejected").inc()
        return result.to_dict()

    async def recalibrate(self, _request: Request) -> Response:
        if self.loader is None:
            return JSONResponse({"error": "re-calibration is off: this server was started without a float model "
                                 "loader"}, status_code=409)
        if self.recal_lock.locked():
            return JSONResponse({"error": "a re-calibration is already running"}, status_code=409)
        rows, need = len(self.engine.reservoir), self.config.min_recalibration_samples
        if rows < need:
            return JSONResponse({"error": f"the reservoir holds {rows} input rows; re-calibration needs at least "
                                 f"{need} (--min-recalibration-samples)"}, status_code=409)
        async with self.recal_lock:
            try:
                out = await asyncio.get_running_loop().run_in_executor(self.recal_pool, self._recalibrate_and_swap)
            except Exception as exc:  # noqa: BLE001 — report the cause, keep serving the current model
                log.exception("re-calibration failed")
                self.engine.metrics.recalibrations.labels(result="failed").inc()
                status = 422 if isinstance(exc, ValueError) else 500
                return JSONResponse({"error": f"re-calibration failed: {type(exc).__name__}: {exc}"},
                                    status_code=status)
        return JSONResponse(out)


def create_app(config: ServeConfig, loader: ModelLoader | None = None) -> ServeApp:
    """The application for ``config``; ``loader`` rebuilds the float model for ``POST /recalibrate``."""
    return ServeApp(config, loader)
