"""Reading a job back from the state store: when the store cannot give it (a damaged page, garbled
bytes), the client gets a 500 naming the reason instead of a bare one, and the log says so once per job."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import TypeVar

from octoflux.core.errors import ServiceError
from octoflux.state.store import StateStore, StateStoreError

log = logging.getLogger(__name__)

LOGGED_JOBS_KEPT = 1024  # a client polling a broken job in a loop logs it once, not once a poll

T = TypeVar("T")


class StoredJobUnreadable(ServiceError):
    status, kind = 500, "state_unreadable"


_logged: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first
_logged_lock = threading.Lock()


def read_back(job_id: str, read: Callable[..., T], *args) -> T:
    """`read(*args)` on the store; `StoredJobUnreadable` when the store holds it damaged. A store that is
    down or busy raises its `StateStoreError` as it came: a 503 to retry (octoflux/core/errors.py)."""
    try:
        return read(*args)
    except StateStoreError as exc:
        cause = exc.__cause__
        if not _damaged(cause):
            raise
        raise unreadable(job_id, str(cause), logged=str(exc)) from None


def _damaged(cause: BaseException | None) -> bool:
    """SQLite's own word for a damaged file (malformed, not a database); a locked file, a full disk, a
    store closed at shutdown or an unreachable Redis is no damage. SQLite's words are safe to show; a
    Redis URL would not be."""
    code = getattr(cause, "sqlite_errorcode", None) if isinstance(cause, sqlite3.Error) else None
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def read_stored_body(store: StateStore, job_id: str) -> bytes | None:
    """The job's stored body (None once expired), whole: every dialect stores JSON (its result route
    serves application/json), so bytes that no longer decode were garbled in the store."""
    body = read_back(job_id, store.get_body, job_id)
    if body is not None:
        try:
            json.loads(body)
        except ValueError:
            raise unreadable(job_id, "its stored bytes are garbled (not the JSON that was stored)") from None
    return body


def unreadable(job_id: str, reason: str, logged: str | None = None) -> StoredJobUnreadable:
    if _first_time(job_id):
        log.error("job %s cannot be read back from the state store: %s", job_id, logged or reason)
    return StoredJobUnreadable(f"job {job_id} cannot be read back from the state store: {reason}")


def _first_time(job_id: str) -> bool:
    with _logged_lock:
        if job_id in _logged:
            return False
        _logged[job_id] = None
        if len(_logged) > LOGGED_JOBS_KEPT:
            del _logged[next(iter(_logged))]
        return True
