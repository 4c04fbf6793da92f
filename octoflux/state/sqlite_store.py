"""The SQLite state store: one file in WAL mode, shared by the processes of one node."""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path

from octoflux.state.records import FAILED, FINAL, PENDING, RUNNING, Delivery, JobRecord, LeasedJob
from octoflux.state.store import (
    DELIVERY_FIELDS,
    EVENTS_KEPT,
    JOB_FIELDS,
    LOST_ERROR_STATUS,
    RecordNotFound,
    StateStore,
    StateStoreError,
    StatusConflict,
    check_final_status,
    expected_statuses,
)


def _sqlite_errors(method):
    """SQLite failures (a file locked past the busy timeout, a full disk) surface as StateStoreError."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StateStoreError(f"SQLite state at {self.path} failed: {exc}") from exc

    return wrapped


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT, request_id TEXT NOT NULL, created_at REAL NOT NULL,
    replica TEXT NOT NULL, status TEXT NOT NULL, encoding TEXT NOT NULL, error TEXT,
    error_status INTEGER, finished_at REAL, webhook_url TEXT, result_url TEXT,
    body BLOB, cancel_requested INTEGER NOT NULL DEFAULT 0, event_seq INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, lease_until REAL, idempotency_key TEXT, request_hash TEXT,
    request BLOB
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) WHERE lease_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS owner_turns (owner TEXT PRIMARY KEY, served INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, event TEXT NOT NULL, PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replicas (name TEXT PRIMARY KEY, beat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replica_loads (name TEXT PRIMARY KEY, at REAL NOT NULL, load TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assets (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, url TEXT NOT NULL, payload BLOB NOT NULL,
    created_at REAL NOT NULL, attempts INTEGER NOT NULL, next_attempt_at REAL NOT NULL,
    status TEXT NOT NULL, last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS result_links (
    token TEXT PRIMARY KEY, media_type TEXT NOT NULL, image BLOB NOT NULL, expires_at REAL NOT NULL
);
"""
_JOB_COLUMNS = ", ".join(JOB_FIELDS)
_DELIVERY_COLUMNS = ", ".join(DELIVERY_FIELDS)
_BUSY_TIMEOUT_MS = 10_000
SCHEMA_VERSION = 3  # PRAGMA user_version of the file
# Version 1 -> 2: jobs keep their result URL; links hold their image instead of pointing into a job.
_MIGRATE_FROM_1 = ("ALTER TABLE jobs ADD COLUMN result_url TEXT", "DROP TABLE IF EXISTS links")
# Version 2 -> 3: jobs wait in the store with their request and are leased. Unfinished version-2 jobs
# have no stored request to run again, so they fail as a lost worker's did.
_MIGRATE_FROM_2 = (
    "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN lease_until REAL",
    "ALTER TABLE jobs ADD COLUMN idempotency_key TEXT",
    "ALTER TABLE jobs ADD COLUMN request_hash TEXT",
    "ALTER TABLE jobs ADD COLUMN request BLOB",
    f"UPDATE jobs SET status = '{FAILED}', error = 'job failed: the server was upgraded; retry it',"
    f" error_status = {LOST_ERROR_STATUS}, finished_at = strftime('%s', 'now')"
    f" WHERE status IN ('{PENDING}', '{RUNNING}')",
)


class SqliteStateStore(StateStore):
    """One SQLite file in WAL mode; a connection per thread; writes in BEGIN IMMEDIATE transactions,
    so a read-check-write is atomic across threads and processes on the node."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create_schema()
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StateStoreError(f"cannot open SQLite state at {self.path}: {exc}") from None

    # ------------------------------------------------------------ plumbing

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise StateStoreError("the state store is closed")
            # isolation_level=None: no implicit transactions; writes say BEGIN IMMEDIATE themselves.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = FULL")  # each commit on disk before it returns: power cuts too
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A transaction holding the file's write lock from its first statement."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _create_schema(self) -> None:
        conn = self._conn()
        conn.execute("PRAGMA journal_mode = WAL")
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version} is newer than this server's")
            if version == 1:
                for statement in _MIGRATE_FROM_1:
                    conn.execute(statement)
            if version in (1, 2):
                for statement in _MIGRATE_FROM_2:
                    conn.execute(statement)
            for statement in _SQLITE_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # ------------------------------------------------------------ async jobs

    @_sqlite_errors
    def create_job(self, rec: JobRecord) -> None:
        marks = ", ".join("?" * len(JOB_FIELDS))
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({marks})", astuple(rec))
        except sqlite3.IntegrityError:
            raise StateStoreError(f"job {rec.id} already exists") from None

    @_sqlite_errors
    def enqueue_job(
        self, rec: JobRecord, request: bytes, ttl_s: float, now: float | None = None
    ) -> JobRecord:
        now = time.time() if now is None else now
        marks = ", ".join("?" * (len(JOB_FIELDS) + 1))
        with self._write() as conn:
            if rec.idempotency_key is not None:
                held = self._idempotent_row(conn, rec.owner, rec.idempotency_key, now - ttl_s)
                if held is not None:
                    return held
                conn.execute(  # an expired job keeps no claim on its key
                    "UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key = ? AND owner IS ?",
                    (rec.idempotency_key, rec.owner),
                )
            try:
                conn.execute(
                    f"INSERT INTO jobs ({_JOB_COLUMNS}, request) VALUES ({marks})", (*astuple(rec), request)
                )
            except sqlite3.IntegrityError:
                raise StateStoreError(f"job {rec.id} already exists") from None
        return rec

    @_sqlite_errors
    def idempotent_job(
        self, owner: str | None, key: str, ttl_s: float, now: float | None = None
    ) -> JobRecord | None:
        now = time.time() if now is None else now
        return self._idempotent_row(self._conn(), owner, key, now - ttl_s)

    @staticmethod
    def _idempotent_row(conn, owner: str | None, key: str, finished_after: float) -> JobRecord | None:
        row = conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE idempotency_key = ? AND owner IS ?"
            " AND (finished_at IS NULL OR finished_at >= ?)",
            (key, owner, finished_after),
        ).fetchone()
        return JobRecord(*row) if row is not None else None

    @_sqlite_errors
    def lease_job(self, replica: str, lease_s: float, now: float | None = None) -> LeasedJob | None:
        now = time.time() if now is None else now
        if not self.queued_count():  # idle processes poll: no write lock while nothing waits
            return None
        with self._write() as conn:
            row = conn.execute(
                "SELECT jobs.id, coalesce(jobs.owner, '') FROM jobs"
                " LEFT JOIN owner_turns ON owner_turns.owner = coalesce(jobs.owner, '')"
                " WHERE jobs.status = ? AND jobs.lease_until IS NULL AND jobs.request IS NOT NULL"
                " ORDER BY coalesce(owner_turns.served, 0), jobs.created_at, jobs.rowid LIMIT 1",
                (PENDING,),
            ).fetchone()
            if row is None:
                return None
            job_id, owner = row
            conn.execute(
                "INSERT INTO owner_turns (owner, served)"
                " SELECT ?, coalesce(max(served), 0) + 1 FROM owner_turns WHERE true"
                " ON CONFLICT (owner) DO UPDATE SET served = excluded.served",
                (owner,),
            )
            conn.execute(
                "UPDATE jobs SET replica = ?, lease_until = ?, attempts = attempts + 1 WHERE id = ?",
                (replica, now + lease_s, job_id),
            )
            row = conn.execute(f"SELECT {_JOB_COLUMNS}, request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return LeasedJob(JobRecord(*row[:-1]), bytes(row[-1]))

    @_sqlite_errors
    def renew_lease(self, job_id: str, replica: str, lease_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND replica = ? AND lease_until IS NOT NULL",
                (now + lease_s, job_id, replica),
            )
            return cur.rowcount == 1

    @_sqlite_errors
    def release_job(self, job_id: str, replica: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, lease_until = NULL, attempts = max(attempts - 1, 0)"
                " WHERE id = ? AND replica = ? AND lease_until IS NOT NULL",
                (PENDING, job_id, replica),
            )
            return cur.rowcount == 1

    @_sqlite_errors
    def reclaim_lapsed(self, max_attempts: int, reason: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._write() as conn:
            lapsed = conn.execute(
                "SELECT id, attempts FROM jobs WHERE lease_until < ? AND status IN (?, ?)",
                (now, PENDING, RUNNING),
            ).fetchall()
            failed = [job_id for job_id, attempts in lapsed if attempts >= max_attempts]
            conn.executemany(
                "UPDATE jobs SET status = ?, error = ?, error_status = ?, finished_at = ?,"
                " lease_until = NULL, request = NULL WHERE id = ?",
                [(FAILED, reason, LOST_ERROR_STATUS, now, job_id) for job_id in failed],
            )
            conn.executemany(
                "UPDATE jobs SET status = ?, lease_until = NULL WHERE id = ?",
                [(PENDING, job_id) for job_id, attempts in lapsed if attempts < max_attempts],
            )
        return failed

    @_sqlite_errors
    def queued_count(self) -> int:
        query = "SELECT count(*) FROM jobs WHERE status = ? AND lease_until IS NULL AND request IS NOT NULL"
        return self._conn().execute(query, (PENDING,)).fetchone()[0]

    @_sqlite_errors
    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    @_sqlite_errors
    def mark_running(self, job_id: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = ? WHERE id = ? AND status = ?", (RUNNING, job_id, PENDING)
            )
            return cur.rowcount == 1

    @_sqlite_errors
    def finish_job(self, job_id, status, *, body=None, error=None, error_status=None) -> bool:
        check_final_status(status)
        marks = ", ".join("?" * len(FINAL))
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, body = ?, error = ?, error_status = ?, finished_at = ?,"
                f" lease_until = NULL, request = NULL WHERE id = ? AND status NOT IN ({marks})",
                (status, body, error, error_status, time.time(), job_id, *FINAL),
            )
            return cur.rowcount == 1

    @_sqlite_errors
    def get_body(self, job_id: str) -> bytes | None:
        row = self._conn().execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    @_sqlite_errors
    def sweep(self, ttl_s: float, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - ttl_s
        marks = ", ".join("?" * len(FINAL))
        with self._write() as conn:
            old = f"SELECT id FROM jobs WHERE finished_at < ? AND status IN ({marks})"
            conn.execute(f"DELETE FROM events WHERE job_id IN ({old})", (cutoff, *FINAL))
            conn.execute("DELETE FROM result_links WHERE expires_at <= ?", (now,))
            count = conn.execute(
                f"DELETE FROM jobs WHERE finished_at < ? AND status IN ({marks})", (cutoff, *FINAL)
            ).rowcount
            conn.execute("DELETE FROM deliveries WHERE status != 'pending' AND created_at < ?", (cutoff,))
            conn.execute("DELETE FROM replicas WHERE beat < ?", (cutoff,))
            conn.execute("DELETE FROM replica_loads WHERE at < ?", (cutoff,))
        return count

    # ------------------------------------------------------------ replicas

    @_sqlite_errors
    def heartbeat(self, replica: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "INSERT INTO replicas (name, beat) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET beat = excluded.beat",
                (replica, now),
            )

    @_sqlite_errors
    def put_replica_load(self, replica: str, load: dict, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "INSERT INTO replica_loads (name, at, load) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET at = excluded.at, load = excluded.load",
                (replica, now, json.dumps(load)),
            )

    @_sqlite_errors
    def replica_loads(self, max_age_s: float, now: float | None = None) -> dict[str, dict]:
        now = time.time() if now is None else now
        rows = self._conn().execute("SELECT name, load FROM replica_loads WHERE at >= ?", (now - max_age_s,))
        return {name: json.loads(load) for name, load in rows}

    # ------------------------------------------------------------ cancellation

    @_sqlite_errors
    def request_cancel(self, job_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,)).rowcount == 1

    @_sqlite_errors
    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------ progress events

    @_sqlite_errors
    def append_event(self, job_id: str, event: dict) -> int:
        encoded = json.dumps(event)
        with self._write() as conn:
            row = conn.execute(
                "UPDATE jobs SET event_seq = event_seq + 1 WHERE id = ? RETURNING event_seq", (job_id,)
            ).fetchone()
            if row is None:
                raise RecordNotFound(job_id)
            seq = row[0]
            conn.execute("INSERT INTO events (job_id, seq, event) VALUES (?, ?, ?)", (job_id, seq, encoded))
            conn.execute("DELETE FROM events WHERE job_id = ? AND seq <= ?", (job_id, seq - EVENTS_KEPT))
        return seq

    @_sqlite_errors
    def events_after(self, job_id: str, seq: int) -> list[tuple[int, dict]]:
        rows = self._conn().execute(
            "SELECT seq, event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq)
        )
        return [(s, json.loads(e)) for s, e in rows]

    # ------------------------------------------------------------ assets

    @_sqlite_errors
    def put_asset(self, asset_id: str, record: dict) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO assets (id, record) VALUES (?, ?)", (asset_id, json.dumps(record))
            )

    @_sqlite_errors
    def create_asset(self, record: dict, live_statuses: set[str]) -> bool:
        with self._write() as conn:
            same_name = [
                (asset_id, json.loads(raw))
                for asset_id, raw in conn.execute("SELECT id, record FROM assets")
                if json.loads(raw).get("name") == record["name"]
            ]
            if any(other.get("status") in live_statuses for _, other in same_name):
                return False
            conn.executemany("DELETE FROM assets WHERE id = ?", [(asset_id,) for asset_id, _ in same_name])
            conn.execute("INSERT INTO assets (id, record) VALUES (?, ?)", (record["id"], json.dumps(record)))
        return True

    @_sqlite_errors
    def get_asset(self, asset_id: str) -> dict | None:
        row = self._conn().execute("SELECT record FROM assets WHERE id = ?", (asset_id,)).fetchone()
        return json.loads(row[0]) if row else None

    @_sqlite_errors
    def list_assets(self) -> list[dict]:
        return [json.loads(r) for (r,) in self._conn().execute("SELECT record FROM assets ORDER BY id")]

    @_sqlite_errors
    def delete_asset(self, asset_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM assets WHERE id = ?", (asset_id,)).rowcount == 1

    @_sqlite_errors
    def update_asset(self, asset_id, expected_status, changes) -> dict:
        expected = expected_statuses(expected_status)
        with self._write() as conn:
            row = conn.execute("SELECT record FROM assets WHERE id = ?", (asset_id,)).fetchone()
            if row is None:
                raise RecordNotFound(asset_id)
            record = json.loads(row[0])
            if expected is not None and record.get("status") not in expected:
                raise StatusConflict(asset_id, record.get("status"), expected)
            record.update(changes)
            conn.execute("UPDATE assets SET record = ? WHERE id = ?", (json.dumps(record), asset_id))
        return record

    # ------------------------------------------------------------ webhook deliveries

    @_sqlite_errors
    def add_delivery(self, d: Delivery) -> None:
        """Store a new delivery; an id already stored keeps its first version (enqueueing is idempotent)."""
        marks = ", ".join("?" * len(DELIVERY_FIELDS))
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING",
                astuple(d),
            )

    @_sqlite_errors
    def claim_due_deliveries(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE status = 'pending'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            ).fetchall()
            claimed = [Delivery(*row) for row in rows]
            for d in claimed:
                d.next_attempt_at = now + lease_s
            conn.executemany(
                "UPDATE deliveries SET next_attempt_at = ? WHERE id = ?",
                [(d.next_attempt_at, d.id) for d in claimed],
            )
        for d in claimed:
            d.payload = bytes(d.payload)
        return claimed

    @_sqlite_errors
    def update_delivery(self, delivery_id, *, attempts, next_attempt_at, status, last_error) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE deliveries SET attempts = ?, next_attempt_at = ?, status = ?, last_error = ?"
                " WHERE id = ?",
                (attempts, next_attempt_at, status, last_error, delivery_id),
            )
            return cur.rowcount == 1

    @_sqlite_errors
    def get_delivery(self, delivery_id: str) -> Delivery | None:
        row = (
            self._conn()
            .execute(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,))
            .fetchone()
        )
        if row is None:
            return None
        d = Delivery(*row)
        d.payload = bytes(d.payload)
        return d

    # ------------------------------------------------------------ result links

    @_sqlite_errors
    def put_link(self, token: str, image: bytes, media_type: str, expires_at: float) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO result_links (token, media_type, image, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (token, media_type, image, expires_at),
            )

    @_sqlite_errors
    def get_link(self, token: str, now: float | None = None) -> tuple[bytes, str] | None:
        now = time.time() if now is None else now
        query = "SELECT image, media_type FROM result_links WHERE token = ? AND expires_at > ?"
        row = self._conn().execute(query, (token, now)).fetchone()
        return (bytes(row[0]), row[1]) if row else None
