"""System services some tests need (a real redis-server), started on a free loopback port; `free_port`.

A pytest plugin (tests/conftest.py loads it: `pytest_plugins = ["helpers.services"]`). Where a service's
program is missing, its tests skip with the reason printed at the end of the run; with CI=true
in the environment such a skip is a failure instead, so CI cannot pass without the service.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS_START_TIMEOUT_S = 10.0
_missing: dict[str, str] = {}  # service -> why its tests did not run


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_ready(url: str) -> bool:
    """Whether the octoflux server at `url` answers /readyz with 200 (False while it is not listening)."""
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def skip_or_fail(service: str, reason: str) -> None:
    """Skip the test that needs `service`; under CI=true fail it."""
    _missing[service] = reason
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service fails the run instead of skipping)")
    pytest.skip(reason)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server (no persistence) on a free loopback port; yields `redis://127.0.0.1:P`."""
    program = shutil.which("redis-server")
    if program is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    log = (workdir / f"redis-{port}.log").open("wb")
    command = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--daemonize", "no", "--dir", str(workdir)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not _ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (workdir / f"redis-{port}.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"redis-server did not answer PING on port {port}: {tail}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def redis_base_url(tmp_path_factory) -> Iterator[str]:
    """`redis://127.0.0.1:P` of one redis-server for the whole session (tests pick a db or flush)."""
    if shutil.which("redis-server") is None:
        skip_or_fail("redis", "redis-server is not installed (apt-get install redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def pytest_terminal_summary(terminalreporter) -> None:
    for service, reason in _missing.items():
        terminalreporter.write_line(f"{service} tests did not run: {reason}", yellow=True)
