"""Graceful shutdown: on SIGTERM stop taking work, finish (or interrupt) the running job, exit 0."""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


def drain(app: FastAPI) -> None:
    """Readiness off first, then refuse new work, fail the queue, and wait for the running job."""
    app.state.service.drain()


class GracefulServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT drain the app while it keeps answering HTTP (503 to new work).

    Only once the worker is idle does uvicorn stop listening and close connections. A second
    signal exits at once. The signal is not re-raised afterwards, so the exit status is 0.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining is None:
            log.info("received %s: draining", signal.Signals(sig).name)
            self._draining = threading.Thread(
                target=self._drain_then_exit, name="octoflux-drain", daemon=True
            )
            self._draining.start()
        else:
            self.should_exit = True
            self.force_exit = True

    def _drain_then_exit(self) -> None:
        try:
            drain(self._app)
        finally:
            self.should_exit = True
