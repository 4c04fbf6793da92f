"""A damaged state store met by a real `octoflux serve`: one line and exit code 2, or with
`--state-repair` a start that logs what it kept and dropped; and a job accepted just before a kill -9
is in the store afterwards."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers.engine_control import wait_until
from helpers.requests import ASYNC, URL_PATH, body
from helpers.services import free_port, server_ready

from octoflux.state.integrity import check_state
from octoflux.state.records import COMPLETED, JobRecord
from octoflux.state.sqlite_files import sidecar
from octoflux.state.sqlite_store import SqliteStateStore

ROOT = Path(__file__).resolve().parents[2]
JOBS = 6
PAGE = 4096


def stored_body(i: int) -> bytes:
    image = base64.b64encode(random.Random(i).randbytes(45_000)).decode()
    return json.dumps({"images": [{"image_b64": image}]}).encode()


def write_store(path: Path, crash: bool) -> None:
    """JOBS completed jobs; `crash`: left as a kill -9 leaves it (all of it in the write-ahead log)."""
    store = SqliteStateStore(path)
    for i in range(JOBS):
        store.create_job(JobRecord(f"job{i}", None, f"req{i}", time.time(), "replica-a"))
        store.finish_job(f"job{i}", COMPLETED, body=stored_body(i))
    if crash:  # copy the files while the store is open, as a process killed now would leave them
        for suffix in ("", "-wal", "-shm"):
            copy = sidecar(path.with_name("crashed.db"), suffix)
            copy.write_bytes(sidecar(path, suffix).read_bytes())
    store.close()
    if crash:
        for suffix in ("", "-wal", "-shm"):
            sidecar(path.with_name("crashed.db"), suffix).rename(sidecar(path, suffix))


def garbage(path: Path, start: int) -> None:
    with path.open("r+b") as file:
        file.seek(start)
        file.write(random.Random(start).randbytes(path.stat().st_size - start))


def serve_command(tiny_checkpoint: str, state_dir: Path, *flags: str) -> list[str]:
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--model", tiny_checkpoint, "--device", "cpu"]
    return [*command, "--state-dir", str(state_dir), "--no-warmup", *flags]


@contextmanager
def serving(command: list[str], log_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen([*command, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server_ready(url) or process.poll() is not None, timeout=120, what="server start")
        assert process.poll() is None, log_path.read_text()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_garbage_over_the_log_after_a_kill_9_stops_serve_with_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    # Every damage the check names is a unit test (tests/unit/state/test_integrity.py); this one is the
    # wiring, with the case SQLite itself would pass over in silence, dropping the jobs in the log.
    db = tmp_path / "state" / "state.db"
    write_store(db, crash=True)
    garbage(sidecar(db, "-wal"), 0)
    done = subprocess.run(
        serve_command(tiny_checkpoint, db.parent, "--port", str(free_port())),
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        f"octoflux: the SQLite state at {db} is damaged: its write-ahead log state.db-wal has"
    )
    assert line.endswith(
        "start with --state-repair to move it aside and keep what still reads (docs/state.md)"
    )


@pytest.mark.timeout(240)
def test_state_repair_starts_logs_what_it_dropped_and_a_job_accepted_before_a_kill_9_stays(
    tiny_checkpoint, tmp_path
):
    db = tmp_path / "state" / "state.db"
    write_store(db, crash=False)
    garbage(db, db.stat().st_size * 3 // 4 // PAGE * PAGE)
    log_path = tmp_path / "server.log"

    with serving(serve_command(tiny_checkpoint, db.parent, "--state-repair"), log_path) as (process, url):
        said = log_path.read_text()
        assert f"state store damaged: the SQLite state at {db} is damaged: SQLite's quick_check found" in said
        kept_line = next(line for line in said.splitlines() if "state repair: kept jobs " in line)
        kept = int(kept_line.split("state repair: kept jobs ")[1].split(",")[0])
        assert 0 < kept < JOBS
        assert f"state repair: dropped jobs: {JOBS - kept} unreadable rows" in said
        statuses = [httpx.get(f"{url}/v1/responses/job{i}", timeout=10).status_code for i in range(JOBS)]
        assert sorted(statuses) == [200] * kept + [404] * (JOBS - kept)
        first_kept = statuses.index(200)
        result = httpx.get(f"{url}/v1/responses/job{first_kept}/result", timeout=10)
        assert result.status_code == 200 and result.content == stored_body(first_kept)

        accepted = httpx.post(
            f"{url}{URL_PATH}", json=body("accepted, then killed"), headers=ASYNC, timeout=30
        )
        process.kill()  # SIGKILL right after the 202: nothing gets to flush or close
        process.wait(10)
    assert accepted.status_code == 202

    check_state(f"sqlite:///{db}")  # a kill -9 leaves a store the startup check passes
    store = SqliteStateStore(db)
    try:
        assert store.get_job(accepted.json()["response_id"]) is not None
    finally:
        store.close()


def test_a_stored_result_that_no_longer_decodes_is_a_500_naming_why(live_server):
    store = live_server.service.state
    store.create_job(JobRecord("garbled-result", None, "req", time.time(), "replica-a"))
    store.finish_job("garbled-result", COMPLETED, body=b'{"images": [{"image_b64": "iVBO\x00\xff')
    response = httpx.get(f"{live_server.url}/v1/responses/garbled-result/result", timeout=10)
    assert response.status_code == 500
    assert response.json()["detail"] == (
        "job garbled-result cannot be read back from the state store: its stored bytes are garbled"
        " (not the JSON that was stored)"
    )
