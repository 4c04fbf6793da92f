"""Accepted async work is never lost: real `octoflux serve` processes killed (SIGKILL), stopped (SIGTERM)
and restarted on one state store; the queue serves API keys in turn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers.engine_control import WAIT, wait_until
from helpers.requests import ASYNC, URL_PATH, body
from helpers.services import free_port, server_ready

from octoflux.state.store import open_state_store

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("queue_server.py")
LEASE_S = "2"  # --lease-timeout: a killed process's job is free again 2 s after its last renewal
START_S = 120
FINAL = ("completed", "failed", "cancelled")

pytestmark = pytest.mark.timeout(300)


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def submit(self, prompt: str, headers: dict | None = None, **fields) -> dict:
        response = httpx.post(
            f"{self.url}{URL_PATH}",
            json=body(prompt, **fields),
            headers={**ASYNC, **(headers or {})},
            timeout=WAIT,
        )
        assert response.status_code == 202, response.text
        return response.json()

    def replica(self) -> str:
        return httpx.get(f"{self.url}/healthz", timeout=WAIT).json()["replica"]


@contextmanager
def serve(
    tmp_path: Path, checkpoint: str, state_url: str, gate: Path, *flags: str, may_die: bool = False
) -> Iterator[Server]:
    """A server process; with `may_die`, one that may be gone (killed by a job) as soon as it is ready."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    command = [sys.executable, str(LAUNCHER), str(gate), "--model", checkpoint, "--device", "cpu"]
    command += ["--port", str(port), "--no-warmup", "--state-url", state_url, "--lease-timeout", LEASE_S]
    command += ["--lora-dir", str(tmp_path / "loras"), *flags]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: server_ready(server.url) or process.poll() is not None, START_S, "server start")
        assert may_die or process.poll() is None, log.read_text()
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def status(server: Server, job: dict) -> dict:
    return httpx.get(f"{server.url}/v1/responses/{job['response_id']}", timeout=WAIT).json()


def wait_final(server: Server, jobs: list[dict], timeout: float = 90) -> list[dict]:
    def all_final():
        found = [status(server, job) for job in jobs]
        return found if all(s["status"] in FINAL for s in found) else None

    return wait_until(all_final, timeout, "every job to end", every=0.2)


def images(server: Server, job: dict) -> list[str]:
    result = httpx.get(f"{server.url}/v1/responses/{job['response_id']}/result", timeout=WAIT)
    assert result.status_code == 200, result.text
    return [image["image_b64"] for image in result.json()["images"]]


def sync_images(server: Server, prompt: str, **fields) -> list[str]:
    response = httpx.post(f"{server.url}{URL_PATH}", json=body(prompt, **fields), timeout=WAIT)
    assert response.status_code == 200, response.text
    return [image["image_b64"] for image in response.json()["images"]]


@pytest.fixture
def gate(tmp_path) -> Path:
    """While this file exists, a job whose prompt starts with `held` stays at its denoising steps."""
    path = tmp_path / "gate"
    path.touch()
    return path


@pytest.fixture(params=["sqlite", "redis"])
def state_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    import redis

    url = f"{request.getfixturevalue('redis_base_url')}/5"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


# Without a seed the server picks one at acceptance; a re-run must still give the same pixels.
JOBS = [("held-running", {}), ("queued-1", {"seed": 11}), ("queued-2", {}), ("queued-3", {"num_images": 2})]


def submit_one_running_three_queued(server: Server) -> list[dict]:
    jobs = [server.submit(prompt, **fields) for prompt, fields in JOBS]
    wait_until(lambda: status(server, jobs[0])["status"] == "running", WAIT, "the held job to start")
    assert [status(server, job)["status"] for job in jobs[1:]] == ["pending"] * 3
    return jobs


def assert_same_pixels_as_an_uninterrupted_run(server: Server, jobs: list[dict]) -> None:
    for job, (prompt, fields) in zip(jobs, JOBS, strict=True):
        result = httpx.get(f"{server.url}/v1/responses/{job['response_id']}/result", timeout=WAIT).json()
        seeds = [image["seed"] for image in result["images"]]
        again = sync_images(server, prompt, **{**fields, "seed": seeds, "num_images": len(seeds)})
        assert images(server, job) == again, prompt


def test_kill_9_then_restart_runs_every_accepted_job_to_the_same_pixels(
    tiny_checkpoint, tmp_path, gate, state_url
):
    with serve(tmp_path, tiny_checkpoint, state_url, gate) as first:
        jobs = submit_one_running_three_queued(first)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(WAIT)
    gate.unlink()
    with serve(tmp_path, tiny_checkpoint, state_url, gate) as second:
        assert [s["status"] for s in wait_final(second, jobs)] == ["completed"] * 4
        assert_same_pixels_as_an_uninterrupted_run(second, jobs)
    store = open_state_store(state_url)
    try:
        assert [store.get_job(job["response_id"]).attempts for job in jobs] == [2, 1, 1, 1]
    finally:
        store.close()


def test_two_processes_on_one_store_the_survivor_finishes_the_killed_one_s_jobs(
    tiny_checkpoint, tmp_path, gate
):
    state_url = f"sqlite:///{tmp_path}/state.db"
    with (
        serve(tmp_path, tiny_checkpoint, state_url, gate) as a,
        serve(tmp_path, tiny_checkpoint, state_url, gate) as b,
    ):
        jobs = [a.submit("held-running")]
        wait_until(lambda: status(a, jobs[0])["status"] == "running", WAIT, "the held job to start")
        jobs += [a.submit(f"queued-{n}") for n in range(3)]
        store = open_state_store(state_url)
        holder = store.get_job(jobs[0]["response_id"]).replica
        victim, survivor = (a, b) if holder == a.replica() else (b, a)
        assert holder == victim.replica()
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(WAIT)
        gate.unlink()
        assert [s["status"] for s in wait_final(survivor, jobs)] == ["completed"] * 4
        records = [store.get_job(job["response_id"]) for job in jobs]
        store.close()
        assert {record.replica for record in records} == {survivor.replica()}
    assert records[0].attempts == 2


def test_sigterm_leaves_queued_jobs_queued_and_a_restart_runs_them_all(tiny_checkpoint, tmp_path, gate):
    state_url = f"sqlite:///{tmp_path}/state.db"
    with serve(tmp_path, tiny_checkpoint, state_url, gate, "--shutdown-timeout", "1") as first:
        jobs = submit_one_running_three_queued(first)
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(WAIT) == 0
    store = open_state_store(state_url)
    # The running job was interrupted past --shutdown-timeout and put back: nothing failed, no attempt spent.
    assert [store.get_job(job["response_id"]).status for job in jobs] == ["pending"] * 4
    assert store.get_job(jobs[0]["response_id"]).attempts == 0
    store.close()
    gate.unlink()
    with serve(tmp_path, tiny_checkpoint, state_url, gate) as second:
        assert [s["status"] for s in wait_final(second, jobs)] == ["completed"] * 4
        assert "the worker running the job was lost" not in second.log.read_text()


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(tiny_checkpoint, tmp_path, gate):
    state_url = f"sqlite:///{tmp_path}/state.db"
    flags = ("--max-attempts", "2")
    with serve(tmp_path, tiny_checkpoint, state_url, gate, *flags) as first:
        ahead = first.submit("held-ahead")  # so the killer's 202 is surely sent before it runs
        doomed = first.submit("kill-worker")
        gate.unlink()
        assert first.process.wait(WAIT) == -signal.SIGKILL
    with serve(tmp_path, tiny_checkpoint, state_url, gate, *flags, may_die=True) as second:
        assert second.process.wait(WAIT) == -signal.SIGKILL  # the second attempt, after the lease lapsed
    with serve(tmp_path, tiny_checkpoint, state_url, gate, *flags) as third:
        done, final = wait_final(third, [ahead, doomed], timeout=WAIT)
        assert (done["status"], final["status"]) == ("completed", "failed")
        assert "the worker running the job was lost" in final["error"] and "tried 2 times" in final["error"]
        assert third.submit("after", seed=3) and third.process.poll() is None
