"""The store keeps what it holds, or says so: each damage the startup check names in one line, what
`--state-repair` keeps and logs, and a result that cannot be read back."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from octoflux.core.stored_results import StoredJobUnreadable, read_stored_body
from octoflux.state.integrity import StateDamaged, check_redis, check_redis_info, check_state
from octoflux.state.records import COMPLETED, JobRecord
from octoflux.state.sqlite_files import WAL_FRAME_HEADER_BYTES, WAL_HEADER_BYTES, in_use, sidecar
from octoflux.state.sqlite_store import SCHEMA_VERSION, SqliteStateStore
from octoflux.state.store import StateStoreError

JOBS = 6
PAGE = 4096  # SQLite's default page size, which the store keeps
FRAME = WAL_FRAME_HEADER_BYTES + PAGE


def stored_body(i: int) -> bytes:
    """A result body as the OctoAI dialect stores it: JSON around a base64 image, big enough to
    spill over several pages."""
    image = base64.b64encode(random.Random(i).randbytes(45_000)).decode()
    return json.dumps({"images": [{"image_b64": image}]}).encode()


def fill(store: SqliteStateStore) -> None:
    for i in range(JOBS):
        store.create_job(JobRecord(f"job{i}", None, f"req{i}", time.time(), "replica-a"))
        store.finish_job(f"job{i}", COMPLETED, body=stored_body(i))


def snapshot(path: Path, folder: Path) -> Path:
    folder.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if sidecar(path, suffix).exists():
            shutil.copyfile(sidecar(path, suffix), sidecar(folder / path.name, suffix))
    return folder / path.name


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """One store of JOBS completed jobs, copied twice: `crashed`, as a kill -9 leaves it (everything
    in the write-ahead log, the index beside it), and `closed`, checkpointed into the file."""
    base = tmp_path_factory.mktemp("stores")
    live = base / "live" / "state.db"
    store = SqliteStateStore(live)
    fill(store)
    crashed = snapshot(live, base / "crashed")  # taken while the store is open: what a kill -9 leaves
    store.close()
    closed = snapshot(live, base / "closed")
    assert sidecar(crashed, "-wal").stat().st_size > JOBS * 10 * FRAME
    assert not sidecar(closed, "-wal").exists()
    return {"crashed": crashed, "closed": closed}


def garbage(path: Path, start: int, length: int | None = None) -> None:
    length = path.stat().st_size - start if length is None else length
    with path.open("r+b") as file:
        file.seek(start)
        file.write(random.Random(start).randbytes(length))


def wal(path: Path) -> Path:
    return sidecar(path, "-wal")


# name: (the store it starts from, the damage, what the refusal says)
DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "zero_bytes_beside_its_wal": (
        "crashed",
        lambda p: os.truncate(p, 0),
        "it is empty (0 bytes) while state.db-wal beside it holds",
    ),
    "missing_beside_its_wal": (
        "crashed",
        lambda p: p.unlink(),
        "it is missing, but state.db-wal beside it holds",
    ),
    "zero_bytes": ("closed", lambda p: os.truncate(p, 0), "it is empty (0 bytes): it was truncated"),
    "garbage_over_the_wal": (
        "crashed",
        lambda p: garbage(wal(p), 0),
        "its write-ahead log state.db-wal has a damaged header",
    ),
    "garbage_over_the_wal_after_its_header": (
        "crashed",
        lambda p: garbage(wal(p), WAL_HEADER_BYTES),
        "its write-ahead log state.db-wal holds 0 readable committed frames where its index state.db-shm",
    ),
    "wal_truncated_inside_a_frame": (
        "crashed",
        lambda p: os.truncate(wal(p), wal(p).stat().st_size // 2),
        "readable committed frames where its index state.db-shm recorded",
    ),
    "wal_truncated_inside_a_frame_without_its_index": (
        "crashed",
        lambda p: (os.truncate(wal(p), wal(p).stat().st_size // 2), sidecar(p, "-shm").unlink()),
        "its write-ahead log state.db-wal ends inside a frame: it was truncated",
    ),
    "wal_truncated_at_a_frame_boundary": (
        "crashed",
        lambda p: os.truncate(wal(p), WAL_HEADER_BYTES + 20 * FRAME),
        "readable committed frames where its index state.db-shm recorded",
    ),
    "garbage_over_the_last_quarter": (
        "closed",
        lambda p: garbage(p, p.stat().st_size * 3 // 4 // PAGE * PAGE),
        "SQLite's quick_check found: Page ",
    ),
    "garbage_after_page_1": ("closed", lambda p: garbage(p, PAGE), "SQLite's quick_check found: Page "),
    "truncated_to_half": (
        "closed",
        lambda p: os.truncate(p, p.stat().st_size // 2 // PAGE * PAGE),
        "it is truncated: ",
    ),
    "not_a_sqlite_file": (
        "closed",
        lambda p: garbage(p, 0, 100),
        "it is not a SQLite database (it does not start with a SQLite header)",
    ),
}


def damaged(stores: dict[str, Path], case: str, tmp_path: Path) -> Path:
    start, damage, _ = DAMAGES[case]
    path = snapshot(stores[start], tmp_path / "state")
    damage(path)
    return path


def contents(path: Path) -> dict[str, bytes]:
    """The store's files in its folder that hold data: the database and its log. The -shm index is a
    cache SQLite rebuilds, and an empty log (a read-only connection leaves one) holds nothing."""
    files = [p for p in sorted(path.parent.iterdir()) if p.is_file() and not p.name.endswith("-shm")]
    return {p.name: p.read_bytes() for p in files if p.stat().st_size or not p.name.endswith("-wal")}


def url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.mark.parametrize("start", ["crashed", "closed"])
def test_a_sound_store_passes_and_the_check_changes_no_file(stores, start, tmp_path):
    path = snapshot(stores[start], tmp_path / "state")
    before = contents(path)
    check_state(url(path))
    assert contents(path) == before


def test_a_frame_torn_by_a_kill_9_after_the_last_commit_is_no_damage(stores, tmp_path):
    # SQLite writes a frame's header and its page in two writes: a kill -9 between them leaves this.
    path = snapshot(stores["crashed"], tmp_path / "state")
    with wal(path).open("ab") as log:
        log.write(random.Random(0).randbytes(WAL_FRAME_HEADER_BYTES + PAGE // 2))
    check_state(url(path))
    store = SqliteStateStore(path)
    try:
        assert [store.get_body(f"job{i}") for i in range(JOBS)] == [stored_body(i) for i in range(JOBS)]
    finally:
        store.close()


@pytest.mark.parametrize("case", DAMAGES)
def test_each_damage_is_refused_in_one_line_naming_the_file_and_nothing_is_touched(stores, case, tmp_path):
    path = damaged(stores, case, tmp_path)
    before = contents(path)
    with pytest.raises(StateDamaged) as refused:
        check_state(url(path))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the SQLite state at {path} is damaged: ")
    assert DAMAGES[case][2] in message
    assert "--state-repair" in message
    assert contents(path) == before  # SQLite never opened it for writing: the evidence is intact


def repair(path: Path, caplog) -> list[str]:
    with caplog.at_level(logging.WARNING, logger="octoflux.state.integrity"):
        check_state(url(path), repair=True)
    return [r.getMessage() for r in caplog.records if r.name == "octoflux.state.integrity"]


@pytest.mark.parametrize("case", DAMAGES)
def test_repair_keeps_every_row_that_reads_whole_and_logs_what_it_dropped(stores, case, tmp_path, caplog):
    path = damaged(stores, case, tmp_path)
    before = contents(path)
    lines = repair(path, caplog)

    (aside,) = {
        p.with_name(p.name.removesuffix("-wal").removesuffix("-shm")) for p in path.parent.glob("*.damaged-*")
    }
    moved = {name.replace(aside.name, "state.db"): data for name, data in contents(aside).items()}
    assert {k: v for k, v in moved.items() if k in before} == before  # moved aside, byte for byte
    assert lines[0].startswith(f"state store damaged: the SQLite state at {path} is damaged: ")
    assert (
        lines[1]
        == f"state repair: moved the damaged files to {aside}; a fresh store at {path} holds what read"
    )

    check_state(url(path))  # what it started is sound
    store = SqliteStateStore(path)
    try:
        kept = [i for i in range(JOBS) if store.get_job(f"job{i}") is not None]
        completed = [i for i in kept if store.get_job(f"job{i}").status == COMPLETED]
        assert all(store.get_body(f"job{i}") == stored_body(i) for i in completed)
    finally:
        store.close()
    said = " ".join(lines)
    if kept:
        assert f"kept jobs {len(kept)}," in said
    if len(kept) < JOBS:  # never a silent loss: the log names the lost rows, or the damaged log they were in
        assert any(
            words in said
            for words in ("dropped jobs:", "write-ahead log", "dropped everything", "kept nothing")
        )


@pytest.mark.parametrize("case", ["zero_bytes_beside_its_wal", "missing_beside_its_wal"])
def test_a_file_emptied_or_lost_beside_a_whole_log_loses_nothing_in_repair(stores, case, tmp_path, caplog):
    path = damaged(stores, case, tmp_path)
    lines = repair(path, caplog)
    assert f"state repair: kept jobs {JOBS}," in lines[2]
    assert (
        lines[3] == "state repair: dropped no row it could find; the damage named above is all that was lost"
    )


def test_repair_counts_the_jobs_it_could_not_read(stores, tmp_path, caplog):
    path = damaged(stores, "garbage_over_the_last_quarter", tmp_path)
    lines = repair(path, caplog)
    kept = int(lines[2].removeprefix("state repair: kept jobs ").split(",")[0])
    assert 0 < kept < JOBS
    assert lines[3].startswith(f"state repair: dropped jobs: {JOBS - kept} unreadable rows")


def test_a_repair_that_fails_half_way_puts_the_damaged_files_back(stores, tmp_path, monkeypatch):
    from octoflux.state import sqlite_repair

    path = damaged(stores, "garbage_over_the_last_quarter", tmp_path)
    before = contents(path)

    def disk_full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlite_repair, "copy_table", disk_full)
    with pytest.raises(StateStoreError) as failed:
        check_state(url(path), repair=True)
    assert str(failed.value) == (
        f"--state-repair of {path} failed, the damaged files are back in place: database or disk is full"
    )
    assert contents(path) == before
    with pytest.raises(StateDamaged):  # the next start refuses again: no half-copied store is served
        check_state(url(path))


@pytest.mark.parametrize("also_damaged", [False, True])
def test_a_schema_newer_than_this_code_is_refused_even_with_repair(stores, tmp_path, also_damaged):
    path = snapshot(stores["closed"], tmp_path / "state")
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    if also_damaged:
        DAMAGES["garbage_over_the_last_quarter"][1](path)
    for repair_it in (False, True):
        with pytest.raises(StateStoreError) as refused:
            check_state(url(path), repair=repair_it)
        if not also_damaged:
            assert not isinstance(refused.value, StateDamaged)
        elif not repair_it:
            assert isinstance(refused.value, StateDamaged)  # the damage is named first
            continue
        assert f"has schema version {SCHEMA_VERSION + 1}, newer than this octoflux's" in str(refused.value)
    assert not list(path.parent.glob("*.damaged-*"))


HOLD_OPEN = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM jobs").fetchone()
print("open", flush=True)
sys.stdin.read()
"""


def test_a_store_another_process_has_open_is_checked_through_sqlite_only(stores, tmp_path):
    path = snapshot(stores["crashed"], tmp_path / "state")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "open\n"
        assert in_use(sidecar(path, "-shm"))
        check_state(url(path))
    finally:
        holder.communicate("", timeout=30)
    assert not in_use(sidecar(path, "-shm"))


def test_repair_waits_for_every_other_process_using_the_store_to_stop(stores, tmp_path):
    path = damaged(stores, "garbage_over_the_last_quarter", tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN.replace("jobs", "sqlite_master"), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(StateStoreError) as refused:
            check_state(url(path), repair=True)
    finally:
        holder.communicate("", timeout=30)
    assert "stop every other process using it before --state-repair moves it aside" in str(refused.value)
    assert not list(path.parent.glob("*.damaged-*"))


def test_store_connections_commit_to_disk_before_returning(tmp_path):
    store = SqliteStateStore(tmp_path / "state.db")
    try:
        assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


# ------------------------------------------------------------------ a result that cannot be read back


def test_a_result_on_a_damaged_page_is_a_500_naming_why_logged_once(stores, tmp_path, caplog):
    path = damaged(stores, "garbage_over_the_last_quarter", tmp_path)
    store = SqliteStateStore(path)  # opened past the startup check, as a file damaged while serving
    try:
        broken = [i for i in range(JOBS) if _unreadable(store, f"job{i}")]
        assert broken
        with caplog.at_level(logging.ERROR, logger="octoflux.core.stored_results"):
            for _ in range(3):
                with pytest.raises(StoredJobUnreadable) as failed:
                    read_stored_body(store, f"job{broken[-1]}")
    finally:
        store.close()
    assert failed.value.status == 500
    assert str(failed.value) == (
        f"job job{broken[-1]} cannot be read back from the state store: database disk image is malformed"
    )
    assert str(path.parent) not in str(failed.value)
    assert len(caplog.records) == 1 and str(path) in caplog.records[0].getMessage()


def _unreadable(store: SqliteStateStore, job_id: str) -> bool:
    try:
        store.get_body(job_id)
    except StateStoreError:
        return True
    return False


def test_a_result_whose_bytes_are_garbled_is_a_500_not_garbage(tmp_path):
    store = SqliteStateStore(tmp_path / "state.db")
    try:
        store.create_job(JobRecord("garbled", None, "req", time.time(), "replica-a"))
        store.finish_job(
            "garbled", COMPLETED, body=stored_body(0)[:1000] + b"\x00\xff" + stored_body(0)[1002:]
        )
        with pytest.raises(StoredJobUnreadable) as failed:
            read_stored_body(store, "garbled")
    finally:
        store.close()
    assert "its stored bytes are garbled" in str(failed.value)


# ------------------------------------------------------------------ Redis


def test_redis_older_than_6_2_is_refused():
    with pytest.raises(StateStoreError) as refused:
        check_redis_info(
            "redis://cache:6379/0", {"redis_version": "6.0.16", "maxmemory_policy": "noeviction"}
        )
    assert (
        str(refused.value) == "Redis at redis://cache:6379/0 is version 6.0.16; octoflux needs 6.2 or later"
    )


def test_a_real_redis_passes_until_it_is_set_to_evict_any_key(redis_base_url):
    import redis

    target = f"redis://:secret@{redis_base_url.removeprefix('redis://')}/0"
    with redis.Redis.from_url(redis_base_url) as client:
        client.config_set("requirepass", "secret")
    try:
        check_redis(target)
        with redis.Redis.from_url(target) as client:
            client.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(StateStoreError) as refused:
            check_redis(target)
    finally:
        with redis.Redis.from_url(target) as client:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("requirepass", "")
    message = str(refused.value)
    assert "secret" not in message and ":***@" in message
    assert "evicts any key when full (maxmemory-policy allkeys-lru)" in message
