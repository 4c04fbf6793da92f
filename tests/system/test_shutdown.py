"""Graceful shutdown of a real `octoflux serve` process on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers.engine_control import WAIT, wait_until
from helpers.requests import ASYNC, URL_PATH, body, post_in_thread
from helpers.services import free_port, server_ready

from octoflux.state.store import open_state_store

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def serve_process(tiny_checkpoint: str, tmp_path: Path, *flags: str):
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--model", tiny_checkpoint, "--device", "cpu"]
    command += ["--port", str(port), "--no-warmup", "--state-dir", str(tmp_path / "state"), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server_ready(url) or process.poll() is not None, timeout=120, what="server start")
        assert process.poll() is None, log_path.read_text()
        yield process, url, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("octoflux_jobs_in_flight "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.timeout(240)
def test_sigterm_drains_finishes_the_running_job_and_exits_zero(tiny_checkpoint, tmp_path):
    with serve_process(tiny_checkpoint, tmp_path, "--shutdown-timeout", "120") as (process, url, log_path):
        results: dict = {}
        # 200 steps, the most allowed: the job must still run while the test queues two more and sends SIGTERM
        # (20 steps of the tiny model take well under a second).
        running = post_in_thread(url, body("running", steps=200), results, "running", timeout=120)
        wait_until(lambda: in_flight(url) == 1, what="the job to start")
        queued = post_in_thread(url, body("queued", steps=2), results, "queued", timeout=120)
        async_job = httpx.post(f"{url}{URL_PATH}", json=body("later", steps=2), headers=ASYNC).json()
        wait_until(lambda: httpx.get(f"{url}/readyz").json().get("queue_depth") == 2, what="two queued")

        process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout=5, what="readyz 503")
        assert httpx.get(f"{url}/readyz").json()["status"] == "shutting down"
        refused = httpx.post(f"{url}{URL_PATH}", json=body("new", steps=2), timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        queued.join(10)
        assert results["queued"].status_code == 503
        # An accepted async job is not lost with the process: it stays queued for the next one.
        assert httpx.get(async_job["poll_url"], timeout=5).json()["status"] == "pending"

        running.join(120)
        assert results["running"].status_code == 200
        assert len(results["running"].json()["images"]) == 1
        assert process.wait(60) == 0
    store = open_state_store(f"sqlite:///{tmp_path / 'state'}/state.db")
    left = store.get_job(async_job["response_id"])
    store.close()
    assert (left.status, left.attempts, left.lease_until) == ("pending", 0, None)

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    statuses = {line.get("status") for line in lines if line.get("path") == URL_PATH}
    assert {200, 202, 503} <= statuses


@pytest.mark.timeout(240)
def test_sigterm_interrupts_a_job_longer_than_the_shutdown_timeout(tiny_checkpoint, tmp_path):
    with serve_process(tiny_checkpoint, tmp_path, "--shutdown-timeout", "1") as (process, url, _):
        results: dict = {}
        # Far longer than the 1 s shutdown timeout, so it is still running when that expires.
        endless = {**body("endless", steps=200), "num_images": 4}
        running = post_in_thread(url, endless, results, "running")
        wait_until(lambda: in_flight(url) == 1, what="the job to start")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        running.join(WAIT)
        assert results["running"].status_code == 503
        assert "interrupted" in results["running"].json()["detail"]
        assert process.wait(WAIT) == 0
        assert time.monotonic() - started < WAIT


DECLARED_BODY_BYTES = 2**20  # a byte per 0.5 s: about six days to send it all


def open_slow_upload(url: str) -> socket.socket:
    """A POST declaring a 1 MB body, returned once the app has started reading that body."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    head = [
        f"POST {URL_PATH} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {DECLARED_BODY_BYTES}",
        "Expect: 100-continue",  # uvicorn answers it when the app first asks for the body
    ]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    received = b""
    while b"100 Continue" not in received:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection instead of reading the body: {received!r}"
        received += chunk
    return sock


def trickle(sock: socket.socket, stop: threading.Event, outcome: dict) -> None:
    try:
        while not stop.wait(0.5):
            sock.sendall(b" ")
    except OSError as exc:
        outcome["send_error"] = exc


def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (a reset counts as closed)."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@pytest.mark.timeout(240)
def test_sigterm_closes_a_connection_still_sending_its_body_once_the_shutdown_timeout_is_spent(
    tiny_checkpoint, tmp_path
):
    with serve_process(tiny_checkpoint, tmp_path, "--shutdown-timeout", "3") as (process, url, _):
        sock = open_slow_upload(url)
        stop, outcome = threading.Event(), {}
        trickler = threading.Thread(target=trickle, args=(sock, stop, outcome), daemon=True)
        trickler.start()
        try:
            process.send_signal(signal.SIGTERM)
            assert process.wait(WAIT) == 0
            answer = read_until_closed(sock)
        finally:
            stop.set()
            trickler.join(WAIT)
            sock.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 5"), answer
