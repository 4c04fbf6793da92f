"""A failing state store answers 503 to retry, and clients polling through an outage do not flood the log."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from octoflux.core import errors
from octoflux.core.errors import problem
from octoflux.core.stored_results import StoredJobUnreadable, read_back
from octoflux.state.store import StateStoreError


def test_a_store_failure_is_a_503_to_retry_and_logged_once_per_interval(monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(errors, "_store_failures", errors._ThrottledLog())
    with caplog.at_level(logging.WARNING, logger="octoflux.core.errors"):
        for _ in range(5):
            found = problem(StateStoreError("Redis at redis://cache:6379/0 failed: connection refused"))
        clock[0] += errors.STORE_FAILURE_LOG_EVERY_S
        problem(StateStoreError("Redis at redis://cache:6379/0 failed: connection refused"))
    assert (found.status, found.kind, found.retry_after) == (503, "state_unavailable", 5)
    assert "redis" not in found.message.lower()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and lines[1].endswith("(4 more since the last line)")


def _failing(cause: BaseException):
    def read():
        raise StateStoreError(f"SQLite state at /srv/state.db failed: {cause}") from cause

    return read


def test_only_sqlite_damage_is_a_500_naming_it_and_other_store_failures_stay_503s():
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
    with pytest.raises(StoredJobUnreadable, match="database disk image is malformed"):
        read_back("damaged-job", _failing(corrupt))
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
    closed = sqlite3.ProgrammingError("Cannot operate on a closed database.")
    for cause in (locked, closed, ConnectionError("connection refused")):
        with pytest.raises(StateStoreError):
            read_back("a-job", _failing(cause))


def test_a_redis_reply_keeps_its_own_words_and_a_lost_connection_its_reason():
    import redis

    from octoflux.state.redis_store import _redis_reason

    refused = redis.ResponseError("NOREPLICAS Not enough good replicas to write. script: 3d9f, on @s:3")
    assert _redis_reason(refused) == "NOREPLICAS Not enough good replicas to write"
    lost = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    assert _redis_reason(lost) == "connection refused"
