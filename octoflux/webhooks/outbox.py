"""A webhook outbox in one SQLite file: deliveries survive a restart and can be shared by processes.

Each call opens its own connection, so the outbox may be used from any thread; a claim runs in an
IMMEDIATE transaction, so two dispatchers on the same file never claim the same delivery at once.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from octoflux.state.records import Delivery

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    status TEXT NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
"""
COLUMNS = "id, job_id, url, payload, created_at, attempts, next_attempt_at, status, last_error"


def _delivery(row: tuple) -> Delivery:
    id_, job_id, url, payload, created_at, attempts, next_at, status, last_error = row
    return Delivery(id_, job_id, url, bytes(payload), created_at, attempts, next_at, status, last_error)


class SqliteOutbox:
    def __init__(self, path: str | Path):
        self.path = str(path)
        with closing(self._connect()) as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def add_delivery(self, d: Delivery) -> None:
        """Insert; a delivery already stored under the same id is kept as it is (same message)."""
        with closing(self._connect()) as db:
            db.execute(
                f"INSERT OR IGNORE INTO webhook_deliveries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    d.id,
                    d.job_id,
                    d.url,
                    d.payload,
                    d.created_at,
                    d.attempts,
                    d.next_attempt_at,
                    d.status,
                    d.last_error,
                ),
            )

    def claim_due_deliveries(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Pending deliveries due by `now`, oldest first; their next_attempt_at moves to now + lease_s."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    f"SELECT {COLUMNS} FROM webhook_deliveries WHERE status = 'pending' "
                    "AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                    (now, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE id = ?",
                    [(now + lease_s, row[0]) for row in rows],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [_delivery(row) for row in rows]

    def update_delivery(
        self, id: str, *, attempts: int, next_attempt_at: float, status: str, last_error: str | None
    ) -> None:
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE webhook_deliveries SET attempts = ?, next_attempt_at = ?, status = ?, last_error = ? "
                "WHERE id = ?",
                (attempts, next_attempt_at, status, last_error, id),
            )

    def get_delivery(self, id: str) -> Delivery | None:
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT {COLUMNS} FROM webhook_deliveries WHERE id = ?", (id,)).fetchone()
        return _delivery(row) if row else None
