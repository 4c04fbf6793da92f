"""ASGI middleware: an X-Request-ID and an X-OctoFlux-Replica on every response, one JSON log line each.

Handlers add fields to the line with `request.state.log.update(...)`; `error` names the kind of
failure, which is also counted in `octoflux_errors`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from octoflux.api.common.dialects import send_error
from octoflux.core import metrics
from octoflux.core.errors import Problem, status_kind

access_log = logging.getLogger("octoflux.access")
log = logging.getLogger(__name__)

HEADER = b"x-request-id"
# Which replica (process) answered: an opaque id, so operators can see how requests spread.
REPLICA_HEADER = b"x-octoflux-replica"
# A caller's id is echoed only if it is short and plain: it ends up in logs and headers.
VALID_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")
# Probes and scrapes are logged at DEBUG so they do not drown the request log.
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")
INTERNAL = Problem(500, "internal", "internal server error")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == HEADER and VALID_ID.match(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def replica_of(scope) -> str | None:
    """The replica id of the app's service (Starlette puts the app in the scope before middleware)."""
    service = getattr(getattr(scope.get("app"), "state", None), "service", None)
    return getattr(service, "replica", None)


def error_kind(status: int, fields: dict) -> str | None:
    if status < 400:
        return None
    return fields.get("error") or status_kind(status)


class RequestContext:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope.get("headers", []))
        ids = [(HEADER, request_id.encode())]
        replica = replica_of(scope)
        if replica:
            ids.append((REPLICA_HEADER, replica.encode()))
        fields: dict = {}
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log"] = fields
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message = {**message, "headers": [*message.get("headers", []), *ids]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Never a traceback to the client; the log has it, keyed by the request id.
            log.exception("unhandled error in request %s", request_id)
            fields.setdefault("error", "internal")
            if not response_started:
                await send_error(send_with_id, scope.get("path", ""), INTERNAL)
        finally:
            self._log(scope, request_id, status, time.perf_counter() - started, fields)

    @staticmethod
    def _log(scope, request_id: str, status: int, seconds: float, fields: dict) -> None:
        quiet = scope.get("path") in QUIET_PATHS
        kind = error_kind(status, fields)
        if kind is not None and not quiet:  # a 503 from /readyz while loading is no error
            metrics.ERRORS.labels(kind).inc()
        line = {
            "ts": round(time.time(), 3),
            "event": "request",
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            **fields,
        }
        if kind is not None:
            line["error"] = kind
        level = logging.DEBUG if quiet and status != 500 else logging.INFO
        access_log.log(level, json.dumps(line, ensure_ascii=False, default=str))


def configure_access_log() -> None:
    """Write the access log as bare JSON lines on stderr, one per request."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
