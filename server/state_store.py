"""Durable state shared by every replica: async jobs and their bodies, cancel flags, progress events,
replica heartbeats, asset records, webhook deliveries and short-lived result links.

Two backends behave identically: `sqlite:///path/state.db` (embedded; one node, several processes)
and `redis://host:port/db` (several nodes). Every method is synchronous and thread-safe; callers run
them in a threadpool. Updates that race between replicas are compare-and-set operations.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from server.records import FAILED, FINAL, PENDING, RUNNING, Delivery, JobRecord

EVENTS_KEPT = 200  # progress events kept per job; older ones are dropped
ORPHAN_ERROR_STATUS = 503  # what a sync call would have answered when its worker was lost
SCHEMA_VERSION = 1

JOB_FIELDS = tuple(f.name for f in fields(JobRecord))
DELIVERY_FIELDS = tuple(f.name for f in fields(Delivery))


class StateStoreError(Exception):
    """The store cannot be opened or used; the message is one line fit for a startup error."""


class RecordNotFound(LookupError):
    """No record with that id."""


class StatusConflict(Exception):
    """A compare-and-set found another status than the one expected."""

    def __init__(self, record_id: str, current: str | None, expected: set[str]):
        self.record_id, self.current, self.expected = record_id, current, expected
        wanted = " or ".join(sorted(expected))
        super().__init__(f"{record_id} is {current}, not {wanted}")


def _expected_set(expected: str | set[str] | None) -> set[str] | None:
    return {expected} if isinstance(expected, str) else expected


def _check_final(status: str) -> None:
    if status not in FINAL:
        raise ValueError(f"finish_job takes a final status ({', '.join(FINAL)}), not {status!r}")


class StateStore(ABC):
    """What outlives a request, shared by every replica; see the module docstring."""

    # ------------------------------------------------------------ async jobs
    @abstractmethod
    def create_job(self, rec: JobRecord) -> None:
        """Store a new job; an id already stored raises StateStoreError."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def mark_running(self, job_id: str) -> bool:
        """pending -> running; False (and no change) from any other status."""

    @abstractmethod
    def finish_job(
        self,
        job_id: str,
        status: str,
        *,
        body: bytes | None = None,
        error: str | None = None,
        error_status: int | None = None,
    ) -> bool:
        """Make the job final; False and no change when it is unknown or already final."""

    @abstractmethod
    def get_body(self, job_id: str) -> bytes | None: ...

    @abstractmethod
    def sweep(self, ttl_s: float, now: float | None = None) -> int:
        """Forget final jobs finished more than ttl_s ago, with body and events; returns how many.

        Also drops expired links, finished deliveries and heartbeats older than ttl_s.
        """

    # ------------------------------------------------------------ replicas
    @abstractmethod
    def heartbeat(self, replica: str, now: float | None = None) -> None: ...

    @abstractmethod
    def fail_orphans(self, lease_s: float, reason: str, now: float | None = None) -> list[str]:
        """Fail pending/running jobs whose replica has not heartbeated within lease_s (or never did)."""

    # ------------------------------------------------------------ cancellation
    @abstractmethod
    def request_cancel(self, job_id: str) -> bool:
        """Flag the job for the replica that runs it; False when the job is unknown."""

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool: ...

    # ------------------------------------------------------------ progress events
    @abstractmethod
    def append_event(self, job_id: str, event: dict) -> int:
        """Store the event under the job's next sequence number (1, 2, ...) and return it."""

    @abstractmethod
    def events_after(self, job_id: str, seq: int) -> list[tuple[int, dict]]:
        """Events with a sequence number above seq, oldest first (only the last EVENTS_KEPT exist)."""

    # ------------------------------------------------------------ assets
    @abstractmethod
    def put_asset(self, asset_id: str, record: dict) -> None: ...

    @abstractmethod
    def get_asset(self, asset_id: str) -> dict | None: ...

    @abstractmethod
    def list_assets(self) -> list[dict]:
        """Every asset record, ordered by id."""

    @abstractmethod
    def delete_asset(self, asset_id: str) -> bool: ...

    @abstractmethod
    def update_asset(self, asset_id: str, expected_status: str | set[str] | None, changes: dict) -> dict:
        """Apply changes when the record's status is expected (None: any); returns the new record.

        Raises RecordNotFound, or StatusConflict when another status is found (nothing changes).
        """

    # ------------------------------------------------------------ webhook deliveries
    @abstractmethod
    def add_delivery(self, d: Delivery) -> None: ...

    @abstractmethod
    def claim_due_deliveries(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Pending deliveries due at `now`, their next_attempt_at pushed to now + lease_s atomically."""

    @abstractmethod
    def update_delivery(
        self, delivery_id: str, *, attempts: int, next_attempt_at: float, status: str, last_error: str | None
    ) -> bool: ...

    @abstractmethod
    def get_delivery(self, delivery_id: str) -> Delivery | None: ...

    # ------------------------------------------------------------ result links
    @abstractmethod
    def put_link(self, token: str, job_id: str, index: int, expires_at: float) -> None: ...

    @abstractmethod
    def get_link(self, token: str, now: float | None = None) -> tuple[str, int] | None:
        """(job_id, image index) until expires_at, then None."""

    @abstractmethod
    def close(self) -> None: ...


def open_state_store(url: str) -> StateStore:
    """`sqlite:///relative/state.db`, `sqlite:////absolute/state.db` or `redis://host:port/db`."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return SqliteStateStore(_sqlite_path(url))
    if scheme in ("redis", "rediss", "unix"):
        return RedisStateStore(url)
    raise StateStoreError(
        f"unsupported state URL {_redact(url)!r}: use sqlite:///path/state.db or redis://host:port/db"
    )


def _sqlite_path(url: str) -> Path:
    path = url.split("://", 1)[1]
    if not path.startswith("/") or path in ("/", "/:memory:"):
        raise StateStoreError(f"bad SQLite state URL {url!r}: use sqlite:///path/state.db (a file)")
    return Path(path[1:])  # "sqlite:///rel.db" -> "rel.db", "sqlite:////abs.db" -> "/abs.db"


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


# ==================================================================== SQLite

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT, request_id TEXT NOT NULL, created_at REAL NOT NULL,
    replica TEXT NOT NULL, status TEXT NOT NULL, encoding TEXT NOT NULL, error TEXT,
    error_status INTEGER, finished_at REAL, webhook_url TEXT,
    body BLOB, cancel_requested INTEGER NOT NULL DEFAULT 0, event_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, event TEXT NOT NULL, PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replicas (name TEXT PRIMARY KEY, beat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assets (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, url TEXT NOT NULL, payload BLOB NOT NULL,
    created_at REAL NOT NULL, attempts INTEGER NOT NULL, next_attempt_at REAL NOT NULL,
    status TEXT NOT NULL, last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS links (
    token TEXT PRIMARY KEY, job_id TEXT NOT NULL, idx INTEGER NOT NULL, expires_at REAL NOT NULL
);
"""
_JOB_COLUMNS = ", ".join(JOB_FIELDS)
_DELIVERY_COLUMNS = ", ".join(DELIVERY_FIELDS)
_BUSY_TIMEOUT_MS = 10_000


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
            conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across process crashes
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

    def create_job(self, rec: JobRecord) -> None:
        marks = ", ".join("?" * len(JOB_FIELDS))
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({marks})", astuple(rec))
        except sqlite3.IntegrityError:
            raise StateStoreError(f"job {rec.id} already exists") from None

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def mark_running(self, job_id: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = ? WHERE id = ? AND status = ?", (RUNNING, job_id, PENDING)
            )
            return cur.rowcount == 1

    def finish_job(self, job_id, status, *, body=None, error=None, error_status=None) -> bool:
        _check_final(status)
        marks = ", ".join("?" * len(FINAL))
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, body = ?, error = ?, error_status = ?, finished_at = ?"
                f" WHERE id = ? AND status NOT IN ({marks})",
                (status, body, error, error_status, time.time(), job_id, *FINAL),
            )
            return cur.rowcount == 1

    def get_body(self, job_id: str) -> bytes | None:
        row = self._conn().execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def sweep(self, ttl_s: float, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - ttl_s
        marks = ", ".join("?" * len(FINAL))
        with self._write() as conn:
            old = f"SELECT id FROM jobs WHERE finished_at < ? AND status IN ({marks})"
            conn.execute(f"DELETE FROM events WHERE job_id IN ({old})", (cutoff, *FINAL))
            conn.execute("DELETE FROM links WHERE expires_at <= ?", (now,))
            count = conn.execute(
                f"DELETE FROM jobs WHERE finished_at < ? AND status IN ({marks})", (cutoff, *FINAL)
            ).rowcount
            conn.execute("DELETE FROM deliveries WHERE status != 'pending' AND created_at < ?", (cutoff,))
            conn.execute("DELETE FROM replicas WHERE beat < ?", (cutoff,))
        return count

    # ------------------------------------------------------------ replicas

    def heartbeat(self, replica: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                "INSERT INTO replicas (name, beat) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET beat = excluded.beat",
                (replica, now),
            )

    def fail_orphans(self, lease_s: float, reason: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._write() as conn:
            rows = conn.execute(
                "SELECT jobs.id FROM jobs LEFT JOIN replicas ON replicas.name = jobs.replica"
                " WHERE jobs.status IN (?, ?) AND (replicas.beat IS NULL OR replicas.beat < ?)",
                (PENDING, RUNNING, now - lease_s),
            ).fetchall()
            ids = [row[0] for row in rows]
            conn.executemany(
                "UPDATE jobs SET status = ?, error = ?, error_status = ?, finished_at = ? WHERE id = ?",
                [(FAILED, reason, ORPHAN_ERROR_STATUS, now, job_id) for job_id in ids],
            )
        return ids

    # ------------------------------------------------------------ cancellation

    def request_cancel(self, job_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,)).rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------ progress events

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

    def events_after(self, job_id: str, seq: int) -> list[tuple[int, dict]]:
        rows = self._conn().execute(
            "SELECT seq, event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq)
        )
        return [(s, json.loads(e)) for s, e in rows]

    # ------------------------------------------------------------ assets

    def put_asset(self, asset_id: str, record: dict) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO assets (id, record) VALUES (?, ?)", (asset_id, json.dumps(record))
            )

    def get_asset(self, asset_id: str) -> dict | None:
        row = self._conn().execute("SELECT record FROM assets WHERE id = ?", (asset_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_assets(self) -> list[dict]:
        return [json.loads(r) for (r,) in self._conn().execute("SELECT record FROM assets ORDER BY id")]

    def delete_asset(self, asset_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM assets WHERE id = ?", (asset_id,)).rowcount == 1

    def update_asset(self, asset_id, expected_status, changes) -> dict:
        expected = _expected_set(expected_status)
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

    def add_delivery(self, d: Delivery) -> None:
        marks = ", ".join("?" * len(DELIVERY_FIELDS))
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES ({marks})", astuple(d))
        except sqlite3.IntegrityError:
            raise StateStoreError(f"delivery {d.id} already exists") from None

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

    def update_delivery(self, delivery_id, *, attempts, next_attempt_at, status, last_error) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE deliveries SET attempts = ?, next_attempt_at = ?, status = ?, last_error = ?"
                " WHERE id = ?",
                (attempts, next_attempt_at, status, last_error, delivery_id),
            )
            return cur.rowcount == 1

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

    def put_link(self, token: str, job_id: str, index: int, expires_at: float) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO links (token, job_id, idx, expires_at) VALUES (?, ?, ?, ?)",
                (token, job_id, index, expires_at),
            )

    def get_link(self, token: str, now: float | None = None) -> tuple[str, int] | None:
        now = time.time() if now is None else now
        row = (
            self._conn()
            .execute("SELECT job_id, idx FROM links WHERE token = ? AND expires_at > ?", (token, now))
            .fetchone()
        )
        return (row[0], row[1]) if row else None


# ==================================================================== Redis

_FINAL_LUA = "{" + ", ".join(f"{s} = true" for s in FINAL) + "}"

# KEYS: record hash, index zset. ARGV: member, score, field/value pairs. 0 when the record exists.
_LUA_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""
_LUA_MARK_RUNNING = f"""
if redis.call('HGET', KEYS[1], 'status') ~= '{PENDING}' then return 0 end
redis.call('HSET', KEYS[1], 'status', '{RUNNING}')
return 1
"""
# KEYS: job, body, active zset, finished zset. ARGV: id, has body, body, finished_at, field/value pairs.
_LUA_FINISH = f"""
local final = {_FINAL_LUA}
local status = redis.call('HGET', KEYS[1], 'status')
if not status or final[status] then return 0 end
redis.call('HDEL', KEYS[1], 'error', 'error_status')
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[3]) end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
return 1
"""
# KEYS: active zset, replicas hash, finished zset. ARGV: cutoff, now, reason, job key prefix, error status.
_LUA_FAIL_ORPHANS = f"""
local failed = {{}}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[4] .. id
  local job = redis.call('HMGET', key, 'status', 'replica')
  if job[1] ~= '{PENDING}' and job[1] ~= '{RUNNING}' then
    redis.call('ZREM', KEYS[1], id)
  else
    local beat = redis.call('HGET', KEYS[2], job[2])
    if not beat or tonumber(beat) < tonumber(ARGV[1]) then
      redis.call('HSET', key, 'status', '{FAILED}', 'error', ARGV[3], 'error_status', ARGV[5],
                 'finished_at', ARGV[2])
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZADD', KEYS[3], ARGV[2], id)
      failed[#failed + 1] = id
    end
  end
end
return failed
"""
_LUA_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
return 1
"""
# KEYS: job, events list. ARGV: encoded event, events kept. 0 when the job is unknown.
_LUA_APPEND_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
redis.call('RPUSH', KEYS[2], seq .. ' ' .. ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
return seq
"""
# KEYS: due zset. ARGV: now, lease end, limit, delivery key prefix. Returns the claimed hashes.
_LUA_CLAIM = """
local claimed = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  redis.call('HSET', ARGV[4] .. id, 'next_attempt_at', ARGV[2])
  claimed[#claimed + 1] = redis.call('HGETALL', ARGV[4] .. id)
end
return claimed
"""
# KEYS: delivery, due zset, done zset. ARGV: id, status, next_attempt_at, field/value pairs.
_LUA_UPDATE_DELIVERY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'last_error')
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] == 'pending' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
end
return 1
"""

_JOB_TYPES = {"created_at": float, "finished_at": float, "error_status": int}
_DELIVERY_TYPES = {"created_at": float, "next_attempt_at": float, "attempts": int}
_REDIS_CONNECT_TIMEOUT_S = 2.0
_REDIS_SOCKET_TIMEOUT_S = 10.0


def _pairs(values: dict) -> list:
    """Field/value pairs for HSET; None values are left out (absent fields read back as None)."""
    return [item for key, value in values.items() if value is not None for item in (key, value)]


def _decode(raw: dict[bytes, bytes], names: tuple[str, ...], types: dict, keep_bytes=()) -> dict:
    values = {}
    for name in names:
        value = raw.get(name.encode())
        if value is not None and name not in keep_bytes:
            value = types.get(name, bytes.decode)(value)
        values[name] = value
    return values


def _redis_reason(exc: Exception) -> str:
    """'connection refused' out of redis-py's 'Error 111 connecting to host:port. Connection refused.'"""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    text = str(exc).strip().rstrip(".")
    return (text.rsplit(". ", 1)[-1] if ". " in text else text).lower() or type(exc).__name__


def _redis_errors(method):
    """Redis failures after startup surface as StateStoreError, like every other store failure."""

    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except self._redis.RedisError as exc:
            raise StateStoreError(f"Redis at {self.url} failed: {_redis_reason(exc)}") from exc

    wrapped.__name__, wrapped.__doc__ = method.__name__, method.__doc__
    return wrapped


class RedisStateStore(StateStore):
    """Redis keys under one prefix; read-check-write updates are Lua scripts (atomic on the server)
    or WATCH/MULTI transactions; result links expire by Redis TTL."""

    def __init__(self, url: str, prefix: str = "octoflux:"):
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            missing = "a redis:// state URL needs the redis package: pip install '.[ray]'"
            raise StateStoreError(missing) from None
        self._redis = redis
        self.url = _redact(url)
        self.prefix = prefix
        options = {
            "socket_connect_timeout": _REDIS_CONNECT_TIMEOUT_S,
            "socket_timeout": _REDIS_SOCKET_TIMEOUT_S,
        }
        try:
            # A single try at startup: a wrong address fails within the connect timeout, not retries.
            with redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0), **options) as probe:
                probe.ping()
            self.client = redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=1.0), 3), **options)
        except redis.AuthenticationError as exc:
            raise StateStoreError(f"Redis at {self.url} refused the credentials: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StateStoreError(f"cannot reach Redis at {self.url}: {_redis_reason(exc)}") from None
        except (redis.RedisError, ValueError) as exc:
            raise StateStoreError(f"cannot use Redis at {self.url}: {exc}") from None
        register = self.client.register_script
        self._create = register(_LUA_CREATE)
        self._mark_running = register(_LUA_MARK_RUNNING)
        self._finish = register(_LUA_FINISH)
        self._fail_orphans = register(_LUA_FAIL_ORPHANS)
        self._cancel = register(_LUA_CANCEL)
        self._append_event = register(_LUA_APPEND_EVENT)
        self._claim = register(_LUA_CLAIM)
        self._update_delivery = register(_LUA_UPDATE_DELIVERY)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------ async jobs

    @_redis_errors
    def create_job(self, rec: JobRecord) -> None:
        values = {name: getattr(rec, name) for name in JOB_FIELDS}
        if rec.status in FINAL:
            index, score = self._key("jobs", "finished"), rec.finished_at or rec.created_at
        else:
            index, score = self._key("jobs", "active"), rec.created_at
        if not self._create(keys=[self._key("job", rec.id), index], args=[rec.id, score, *_pairs(values)]):
            raise StateStoreError(f"job {rec.id} already exists")

    @_redis_errors
    def get_job(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(self._key("job", job_id))
        return JobRecord(**_decode(raw, JOB_FIELDS, _JOB_TYPES)) if raw else None

    @_redis_errors
    def mark_running(self, job_id: str) -> bool:
        return bool(self._mark_running(keys=[self._key("job", job_id)]))

    @_redis_errors
    def finish_job(self, job_id, status, *, body=None, error=None, error_status=None) -> bool:
        _check_final(status)
        now = time.time()
        values = {"status": status, "finished_at": now, "error": error, "error_status": error_status}
        keys = [
            self._key("job", job_id),
            self._key("body", job_id),
            self._key("jobs", "active"),
            self._key("jobs", "finished"),
        ]
        args = [job_id, "1" if body is not None else "0", body if body is not None else b"", now]
        return bool(self._finish(keys=keys, args=args + _pairs(values)))

    @_redis_errors
    def get_body(self, job_id: str) -> bytes | None:
        return self.client.get(self._key("body", job_id))

    @_redis_errors
    def sweep(self, ttl_s: float, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - ttl_s
        finished = self._key("jobs", "finished")
        ids = [i.decode() for i in self.client.zrangebyscore(finished, "-inf", f"({cutoff!r}")]
        done = self._key("deliveries", "done")
        deliveries = [i.decode() for i in self.client.zrangebyscore(done, "-inf", f"({cutoff!r}")]
        beats = self.client.hgetall(self._key("replicas"))
        stale = [name for name, beat in beats.items() if float(beat) < cutoff]
        with self.client.pipeline() as pipe:  # MULTI/EXEC
            for job_id in ids:
                pipe.delete(self._key("job", job_id), self._key("body", job_id), self._key("events", job_id))
            if ids:
                pipe.zrem(finished, *ids)
            for delivery_id in deliveries:
                pipe.delete(self._key("delivery", delivery_id))
            if deliveries:
                pipe.zrem(done, *deliveries)
            if stale:
                pipe.hdel(self._key("replicas"), *stale)
            pipe.execute()
        return len(ids)

    # ------------------------------------------------------------ replicas

    @_redis_errors
    def heartbeat(self, replica: str, now: float | None = None) -> None:
        self.client.hset(self._key("replicas"), replica, time.time() if now is None else now)

    @_redis_errors
    def fail_orphans(self, lease_s: float, reason: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        keys = [self._key("jobs", "active"), self._key("replicas"), self._key("jobs", "finished")]
        args = [now - lease_s, now, reason, self._key("job", ""), ORPHAN_ERROR_STATUS]
        return [i.decode() for i in self._fail_orphans(keys=keys, args=args)]

    # ------------------------------------------------------------ cancellation

    @_redis_errors
    def request_cancel(self, job_id: str) -> bool:
        return bool(self._cancel(keys=[self._key("job", job_id)]))

    @_redis_errors
    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(self._key("job", job_id), "cancel_requested") == b"1"

    # ------------------------------------------------------------ progress events

    @_redis_errors
    def append_event(self, job_id: str, event: dict) -> int:
        keys = [self._key("job", job_id), self._key("events", job_id)]
        seq = self._append_event(keys=keys, args=[json.dumps(event), EVENTS_KEPT])
        if not seq:
            raise RecordNotFound(job_id)
        return int(seq)

    @_redis_errors
    def events_after(self, job_id: str, seq: int) -> list[tuple[int, dict]]:
        events = []
        for item in self.client.lrange(self._key("events", job_id), 0, -1):
            number, encoded = item.split(b" ", 1)
            if int(number) > seq:
                events.append((int(number), json.loads(encoded)))
        return events

    # ------------------------------------------------------------ assets

    @_redis_errors
    def put_asset(self, asset_id: str, record: dict) -> None:
        with self.client.pipeline() as pipe:
            pipe.set(self._key("asset", asset_id), json.dumps(record))
            pipe.sadd(self._key("assets"), asset_id)
            pipe.execute()

    @_redis_errors
    def get_asset(self, asset_id: str) -> dict | None:
        raw = self.client.get(self._key("asset", asset_id))
        return json.loads(raw) if raw is not None else None

    @_redis_errors
    def list_assets(self) -> list[dict]:
        ids = sorted(i.decode() for i in self.client.smembers(self._key("assets")))
        if not ids:
            return []
        raws = self.client.mget([self._key("asset", i) for i in ids])
        return [json.loads(raw) for raw in raws if raw is not None]

    @_redis_errors
    def delete_asset(self, asset_id: str) -> bool:
        with self.client.pipeline() as pipe:
            pipe.delete(self._key("asset", asset_id))
            pipe.srem(self._key("assets"), asset_id)
            deleted, _ = pipe.execute()
        return deleted == 1

    @_redis_errors
    def update_asset(self, asset_id, expected_status, changes) -> dict:
        expected = _expected_set(expected_status)
        key = self._key("asset", asset_id)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # EXEC fails if another client writes the key before it
                    raw = pipe.get(key)
                    if raw is None:
                        raise RecordNotFound(asset_id)
                    record = json.loads(raw)
                    if expected is not None and record.get("status") not in expected:
                        raise StatusConflict(asset_id, record.get("status"), expected)
                    record.update(changes)
                    pipe.multi()
                    pipe.set(key, json.dumps(record))
                    pipe.execute()
                    return record
                except self._redis.WatchError:
                    continue  # someone else changed it: read again and re-check

    # ------------------------------------------------------------ webhook deliveries

    def _delivery_index(self, status: str) -> str:
        return self._key("deliveries", "due" if status == "pending" else "done")

    @_redis_errors
    def add_delivery(self, d: Delivery) -> None:
        values = {name: getattr(d, name) for name in DELIVERY_FIELDS}
        score = d.next_attempt_at if d.status == "pending" else d.created_at
        keys = [self._key("delivery", d.id), self._delivery_index(d.status)]
        if not self._create(keys=keys, args=[d.id, score, *_pairs(values)]):
            raise StateStoreError(f"delivery {d.id} already exists")

    def _delivery(self, raw: dict[bytes, bytes]) -> Delivery:
        return Delivery(**_decode(raw, DELIVERY_FIELDS, _DELIVERY_TYPES, keep_bytes=("payload",)))

    @_redis_errors
    def claim_due_deliveries(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        keys = [self._key("deliveries", "due")]
        claimed = self._claim(keys=keys, args=[now, now + lease_s, limit, self._key("delivery", "")])
        return [self._delivery(dict(zip(flat[::2], flat[1::2], strict=True))) for flat in claimed]

    @_redis_errors
    def update_delivery(self, delivery_id, *, attempts, next_attempt_at, status, last_error) -> bool:
        values = {"attempts": attempts, "next_attempt_at": next_attempt_at, "status": status}
        values["last_error"] = last_error
        keys = [
            self._key("delivery", delivery_id),
            self._key("deliveries", "due"),
            self._key("deliveries", "done"),
        ]
        args = [delivery_id, status, next_attempt_at, *_pairs(values)]
        return bool(self._update_delivery(keys=keys, args=args))

    @_redis_errors
    def get_delivery(self, delivery_id: str) -> Delivery | None:
        raw = self.client.hgetall(self._key("delivery", delivery_id))
        return self._delivery(raw) if raw else None

    # ------------------------------------------------------------ result links

    @_redis_errors
    def put_link(self, token: str, job_id: str, index: int, expires_at: float) -> None:
        key = self._key("link", token)
        if expires_at <= time.time():
            self.client.delete(key)
            return
        value = json.dumps([job_id, index, expires_at])
        self.client.set(key, value, pxat=int(expires_at * 1000) + 1)

    @_redis_errors
    def get_link(self, token: str, now: float | None = None) -> tuple[str, int] | None:
        raw = self.client.get(self._key("link", token))
        if raw is None:
            return None
        job_id, index, expires_at = json.loads(raw)
        return (job_id, index) if expires_at > (time.time() if now is None else now) else None
