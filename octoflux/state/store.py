"""Durable state shared by every replica: async jobs with their requests and bodies (the queue every
process leases work from), cancel flags, progress events, replica heartbeats, asset records, webhook
deliveries and short-lived result links.

Two backends behave identically: `sqlite:///path/state.db` (octoflux/state/sqlite_store.py; embedded, one
node, several processes) and `redis://host:port/db` (octoflux/state/redis_store.py; several nodes). Every
method is synchronous and thread-safe; callers run them in a threadpool. Updates that race between
replicas are compare-and-set operations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from octoflux.state.records import FINAL, Delivery, JobRecord, LeasedJob

EVENTS_KEPT = 200  # progress events kept per job; older ones are dropped
LOST_ERROR_STATUS = 503  # what a sync call would have answered when its worker was lost

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


def expected_statuses(expected: str | set[str] | None) -> set[str] | None:
    return {expected} if isinstance(expected, str) else expected


def check_final_status(status: str) -> None:
    if status not in FINAL:
        raise ValueError(f"finish_job takes a final status ({', '.join(FINAL)}), not {status!r}")


class StateStore(ABC):
    """What outlives a request, shared by every replica; see the module docstring."""

    # ------------------------------------------------------------ async jobs
    @abstractmethod
    def create_job(self, rec: JobRecord) -> None:
        """Store a new job; an id already stored raises StateStoreError."""

    @abstractmethod
    def enqueue_job(
        self, rec: JobRecord, request: bytes, ttl_s: float, now: float | None = None
    ) -> JobRecord:
        """Store a new pending job with the request a process will run, in one write; returns it.

        When `rec.idempotency_key` is set and a job of the same owner holds that key (and has not
        expired: finished less than ttl_s ago), nothing is stored and that job is returned instead.
        """

    @abstractmethod
    def idempotent_job(
        self, owner: str | None, key: str, ttl_s: float, now: float | None = None
    ) -> JobRecord | None:
        """The job of `owner` holding Idempotency-Key `key`, unless it finished more than ttl_s ago."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def lease_job(self, replica: str, lease_s: float, now: float | None = None) -> LeasedJob | None:
        """Take the next queued job for `replica` until now + lease_s, counting an attempt; None if none.

        Fair share: of the owners with jobs waiting, the one served longest ago goes first (one never
        served before all others), and of its jobs the oldest. Atomic across processes.
        """

    @abstractmethod
    def renew_lease(self, job_id: str, replica: str, lease_s: float, now: float | None = None) -> bool:
        """Extend the lease `replica` holds; False when it holds it no longer (lapsed, or final)."""

    @abstractmethod
    def release_job(self, job_id: str, replica: str) -> bool:
        """Put a job `replica` holds back in the queue, its attempt not counted (a shutdown)."""

    @abstractmethod
    def reclaim_lapsed(self, max_attempts: int, reason: str, now: float | None = None) -> list[str]:
        """Re-queue unfinished jobs whose lease lapsed; fail those that used max_attempts (with
        `reason`, the error status a lost worker gives); returns the ids failed."""

    @abstractmethod
    def queued_count(self) -> int:
        """Jobs waiting in the queue, not leased."""

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
        """Make the job final (once: results are written once); False and no change when it is unknown
        or already final. Its lease and stored request go with it."""

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
    def put_replica_load(self, replica: str, load: dict, now: float | None = None) -> None:
        """What a replica reports about itself (queue depth, jobs in flight, readiness), timestamped."""

    @abstractmethod
    def replica_loads(self, max_age_s: float, now: float | None = None) -> dict[str, dict]:
        """The last report of each replica that reported within max_age_s, by replica."""

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
    def create_asset(self, record: dict, live_statuses: set[str]) -> bool:
        """Store a new record unless another one of the same `name` has a status in live_statuses.

        Atomic across replicas: of two creates of one name exactly one returns True. Records of the
        name in other statuses (rejected, deleted) are removed: the new one supersedes them.
        """

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
    def put_link(self, token: str, image: bytes, media_type: str, expires_at: float) -> None:
        """One image behind an unguessable token, kept until expires_at."""

    @abstractmethod
    def get_link(self, token: str, now: float | None = None) -> tuple[bytes, str] | None:
        """(image bytes, media type) until expires_at, then None."""

    @abstractmethod
    def close(self) -> None: ...


def open_state_store(url: str) -> StateStore:
    """`sqlite:///relative/state.db`, `sqlite:////absolute/state.db` or `redis://host:port/db`."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        from octoflux.state.sqlite_store import SqliteStateStore

        return SqliteStateStore(_sqlite_path(url))
    if scheme in ("redis", "rediss", "unix"):
        from octoflux.state.redis_store import RedisStateStore

        return RedisStateStore(url)
    raise StateStoreError(
        f"unsupported state URL {redact_url(url)!r}: use sqlite:///path/state.db or redis://host:port/db"
    )


def _sqlite_path(url: str) -> Path:
    path = url.split("://", 1)[1]
    if not path.startswith("/") or path in ("/", "/:memory:"):
        raise StateStoreError(f"bad SQLite state URL {url!r}: use sqlite:///path/state.db (a file)")
    return Path(path[1:])  # "sqlite:///rel.db" -> "rel.db", "sqlite:////abs.db" -> "/abs.db"


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def __getattr__(name: str):
    """`from octoflux.state.store import SqliteStateStore` works too; Redis's module loads on first use."""
    if name == "SqliteStateStore":
        from octoflux.state.sqlite_store import SqliteStateStore

        return SqliteStateStore
    if name == "RedisStateStore":
        from octoflux.state.redis_store import RedisStateStore

        return RedisStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
