"""Startup checks of the state store: it holds what it held, or the server refuses with one line.

SQLite: the file is a SQLite database of a whole number of pages, no shorter than its header says;
its write-ahead log has a sound header, ends on a frame boundary and holds every commit its index
(`-shm`) recorded; `PRAGMA quick_check` passes; its schema is not newer than this code's. Redis:
reachable, recent enough, and not set to evict keys. `--state-repair` moves a damaged SQLite file
aside and keeps what still reads (octoflux/state/sqlite_repair.py).
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

from octoflux.state.sqlite_files import (
    file_size,
    in_use,
    read_db_header,
    scan_wal,
    shm_committed_frames,
    sidecar,
)
from octoflux.state.sqlite_repair import repair_sqlite
from octoflux.state.sqlite_store import SCHEMA_VERSION
from octoflux.state.store import StateStoreError, _sqlite_path, redact_url

log = logging.getLogger(__name__)

QUICK_CHECK_ROWS = 5
REDIS_MIN_VERSION = (6, 2)  # the Lua scripts and commands the Redis store sends
REDIS_EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


class StateDamaged(StateStoreError):
    """The store lost or garbled data it held; `--state-repair` can keep what still reads."""

    def __init__(self, path: Path, damage: str):
        self.path, self.damage = path, damage
        super().__init__(
            f"the SQLite state at {path} is damaged: {damage}; start with --state-repair to move it aside"
            " and keep what still reads (docs/state.md)"
        )


def check_state(url: str, repair: bool = False) -> None:
    """Before serving: the store is sound, or repaired (and the loss logged), or one-line StateStoreError."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        return check_redis(url)
    if scheme != "sqlite":
        return None  # open_state_store names the bad URL
    path = _sqlite_path(url)
    try:
        check_sqlite(path)
    except StateDamaged as damaged:
        if not repair:
            raise
        if in_use(sidecar(path, "-shm")):
            raise StateStoreError(
                f"the SQLite state at {path} is damaged: {damaged.damage}; stop every other process using it"
                " before --state-repair moves it aside"
            ) from None
        check_damaged_schema(path)
        log.warning("state store damaged: %s", damaged)
        for line in repair_sqlite(path).lines():
            log.warning("state repair: %s", line)
        check_sqlite(path)
    return None


# ------------------------------------------------------------------ SQLite


def check_sqlite(path: Path) -> None:
    """StateDamaged naming the damage, or StateStoreError for a schema newer than this code's."""
    try:
        damage = sqlite_damage(path)
    except OSError as exc:  # a file it may not read: not damage, and no repair helps
        raise StateStoreError(f"cannot read SQLite state at {path}: {exc.strerror or exc}") from None
    if damage is not None:
        raise StateDamaged(path, damage)
    check_sqlite_schema(path)


def sqlite_damage(path: Path) -> str | None:
    """What is wrong with the SQLite file at path, in words; None when nothing is."""
    wal, shm = sidecar(path, "-wal"), sidecar(path, "-shm")
    if in_use(shm):  # another process writes to it: its files change under us; SQLite's view is sound
        return read_damage(path)
    if not path.exists():
        wal_bytes = file_size(wal)
        return f"it is missing, but {wal.name} beside it holds {wal_bytes} bytes" if wal_bytes else None
    return file_damage(path, wal, shm) or read_damage(path)


def file_damage(path: Path, wal: Path, shm: Path) -> str | None:
    """Damage visible in the files themselves, before SQLite opens them."""
    size = file_size(path)
    if size == 0:
        wal_bytes = file_size(wal)
        beside = f" while {wal.name} beside it holds {wal_bytes} bytes" if wal_bytes else ""
        return f"it is empty (0 bytes){beside}: it was truncated"
    header = read_db_header(path)
    if header is None:
        return "it is not a SQLite database (it does not start with a SQLite header)"
    if size % header.page_size:
        return f"its size ({size} bytes) is not a whole number of {header.page_size}-byte pages"
    if header.pages is not None and size < header.pages * header.page_size:
        return f"it is truncated: {size} bytes where its header says {header.pages * header.page_size}"
    if not header.wal_mode and file_size(wal):
        return (
            f"its header is damaged (not in WAL mode while {wal.name} beside it holds {file_size(wal)} bytes)"
        )
    return wal_damage(wal, shm, header.page_size)


def wal_damage(wal: Path, shm: Path, page_size: int) -> str | None:
    """A write-ahead log of which SQLite would use less than was committed to it."""
    wal_bytes = file_size(wal)
    if not wal_bytes:
        return None
    scan = scan_wal(wal)
    if scan is None or scan.page_size != page_size:
        return f"its write-ahead log {wal.name} has a damaged header ({wal_bytes} bytes of log unreadable)"
    recorded = shm_committed_frames(shm, scan.salts)
    if recorded is not None and recorded > scan.committed:
        return (
            f"its write-ahead log {wal.name} holds {scan.committed} readable committed frames where its index"
            f" {shm.name} recorded {recorded}: it was truncated or overwritten"
        )
    # A kill -9 between the writes of one frame leaves a torn frame after the last commit, which SQLite
    # ignores: no damage while the index vouches for every committed frame. Without the index, a log
    # ending inside a frame may have lost committed ones.
    if not scan.whole and recorded is None:
        return f"its write-ahead log {wal.name} ends inside a frame: it was truncated"
    return None


def read_damage(path: Path) -> str | None:
    """What SQLite itself finds, reading the database read-only (its log and index left as they are)."""
    try:
        with closing(read_only(path)) as conn:
            problems = [row[0] for row in conn.execute(f"PRAGMA quick_check({QUICK_CHECK_ROWS})")]
    except sqlite3.OperationalError as exc:  # permissions, locks, I/O: not damage, and no repair helps
        raise StateStoreError(f"cannot open SQLite state at {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        return f"SQLite cannot read it: {exc}"
    if problems == ["ok"]:
        return None
    # A row can span lines ("*** in database main ***\nPage 92: ..."); the refusal is one line.
    found = [line for text in problems for line in text.splitlines() if not line.startswith("***")]
    more = " and more" if len(found) > 2 else ""
    return f"SQLite's quick_check found: {'; '.join(found[:2])}{more}"


def check_sqlite_schema(path: Path) -> None:
    """A schema newer than this code's is refused, repair or not: an older octoflux must not rewrite it."""
    if not path.exists():
        return
    try:
        version = schema_version(path)
    except sqlite3.Error as exc:
        raise StateStoreError(f"cannot open SQLite state at {path}: {exc}") from None
    refuse_newer_schema(path, version)


def check_damaged_schema(path: Path) -> None:
    """Repair copies rows into this code's schema: a newer one's columns would be dropped, so refuse."""
    # A connection to a file without a WAL-mode header would delete the log beside it: never open one.
    header = read_db_header(path) if path.exists() else None
    if header is None or not header.wal_mode:
        return
    try:
        version = schema_version(path)
    except sqlite3.Error:
        return  # too damaged to say: what reads is copied by the columns this code knows
    refuse_newer_schema(path, version)


def schema_version(path: Path) -> int:
    with closing(read_only(path)) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def refuse_newer_schema(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StateStoreError(
            f"the SQLite state at {path} has schema version {version}, newer than this octoflux's"
            f" {SCHEMA_VERSION}: run the newer octoflux, or point --state-url elsewhere"
        )


def read_only(path: Path) -> sqlite3.Connection:
    """A connection that never checkpoints, truncates or deletes the log when it closes."""
    return sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)


# ------------------------------------------------------------------ Redis


def check_redis(url: str) -> None:
    """Reachable (the store's own probe), version REDIS_MIN_VERSION or later, not evicting keys."""
    from octoflux.state.redis_store import RedisStateStore

    store = RedisStateStore(url)
    try:
        info = {**store.client.info("server"), **store.client.info("memory")}
    except store._redis.RedisError as exc:
        raise StateStoreError(f"cannot use Redis at {redact_url(url)}: {exc}") from None
    finally:
        store.close()
    check_redis_info(redact_url(url), info)


def check_redis_info(shown_url: str, info: dict) -> None:
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if parts < REDIS_MIN_VERSION:
        needed = ".".join(map(str, REDIS_MIN_VERSION))
        raise StateStoreError(f"Redis at {shown_url} is version {version}; octoflux needs {needed} or later")
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy in REDIS_EVICTING:
        raise StateStoreError(
            f"Redis at {shown_url} evicts any key when full (maxmemory-policy {policy}): jobs would"
            " vanish; set maxmemory-policy noeviction or a volatile-* policy"
        )
