"""Graceful shutdown: on SIGTERM stop taking work, finish (or interrupt) the running job, exit 0."""

from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

# Open connections get at least this long after the drain, even when it used up --shutdown-timeout:
# the answers of the job that just finished or was interrupted still have to be written.
LAST_ANSWERS_S = 2.0


def drain(app: FastAPI) -> None:
    """Readiness off first, then refuse new work, fail the queue, and wait for the running job."""
    app.state.service.drain()


class GracefulServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT drain the app while it keeps answering HTTP (503 to new work).

    Only once the worker is idle does uvicorn stop listening and close connections. Connections
    still open (a client still sending its body) get what is left of the config's
    `timeout_graceful_shutdown` (--shutdown-timeout, counted from the signal); then uvicorn cancels
    their requests. A second signal exits at once. The signal is not re-raised afterwards, so the
    exit status is 0.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining is None:
            log.info("received %s: draining", signal.Signals(sig).name)
            self._draining = threading.Thread(
                target=self._drain_then_exit, args=(time.monotonic(),), name="octoflux-drain", daemon=True
            )
            self._draining.start()
        else:
            self.should_exit = True
            self.force_exit = True

    def _drain_then_exit(self, signalled_at: float) -> None:
        try:
            drain(self._app)
        finally:
            self._leave_connections_the_rest(signalled_at)
            self.should_exit = True

    def _leave_connections_the_rest(self, signalled_at: float) -> None:
        budget = self.config.timeout_graceful_shutdown
        if budget is not None:  # uvicorn reads it once it stops listening
            rest = budget - (time.monotonic() - signalled_at)
            self.config.timeout_graceful_shutdown = max(rest, LAST_ANSWERS_S)
