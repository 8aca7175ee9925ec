"""Deployment guard: serve the INT8 model with a float shadow, metrics, an automatic fallback and re-calibration.

    lowbit serve DIR --port P [--shadow-rate 0.05] [--max-bad 5] [--recover-good 20] [--threshold kl=0.2,sqnr_db=8]
                 [--admin-token-file PATH] [--keep-versions 5] [--read-timeout 10] [--max-connections 256]
    lowbit recalibrate DIR --data D

A model folder is trusted code: re-calibration imports and calls the float model it records.

``create_app(ServeConfig(DIR, ...), loader)`` builds the Starlette application; ``run_server`` /
``ServerThread`` run it on uvicorn. See :mod:`lowbit.serve.app` for the routes.
"""

from lowbit.serve.app import ServeApp, create_app
from lowbit.serve.config import ServeConfig, Threshold
from lowbit.serve.fuse import Fuse, FuseState
from lowbit.serve.recalibrate import RecalibrationResult, recalibrate
from lowbit.serve.server import ServerThread, bind_socket, run_server

__all__ = ["Fuse", "FuseState", "RecalibrationResult", "ServeApp", "ServeConfig", "ServerThread", "Threshold",
           "bind_socket", "create_app", "recalibrate", "run_server"]
