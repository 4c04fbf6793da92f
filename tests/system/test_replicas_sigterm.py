"""`octoflux serve --replicas 2` as a user runs it: SIGTERM finishes the running request, exits 0
and leaves no Ray process behind. Its own module, so no other Ray instance runs beside it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from helpers.engine_control import wait_until
from helpers.services import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_for_replicas(url: str, replicas: int, timeout: float = 180) -> None:
    seen: set[str] = set()

    def all_ready() -> bool:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                seen.add(httpx.get(f"{url}/healthz", timeout=5).json()["replica"])
        except httpx.HTTPError:
            pass
        return len(seen) >= replicas

    wait_until(all_ready, timeout, f"{replicas} replicas to become ready", every=0.1)


def jobs_in_flight(url: str) -> float:
    """Jobs running in the deployment, as its replicas last reported them (every 2 s) on /metrics."""
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.search(r"^octoflux_deployment_jobs_in_flight (\S+)$", metrics, re.MULTILINE)
    return float(found[1]) if found else 0.0


@pytest.mark.timeout(300)
def test_sigterm_finishes_the_running_request_exits_zero_and_leaves_no_ray_process(tiny_checkpoint, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--replicas", "2", "--device", "cpu"]
    command += ["--model", tiny_checkpoint, "--port", str(port), "--state-dir", str(tmp_path / "state")]
    command += ["--lora-dir", str(tmp_path), "--warmup-steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_replicas(url, 2)
        family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert any("raylet" in " ".join(p.cmdline()) for p in family if p.is_running())
        outcome: dict = {}
        # 200 steps of 2 images: about 7 s of work on a replica here, several times the 2 s it may
        # take the replicas to report the job running, after which SIGTERM follows at once.
        body = {"prompt": "a long one", "width": 512, "height": 512, "steps": 200, "num_images": 2}

        def generate() -> None:
            try:
                outcome["response"] = httpx.post(f"{url}/generate/flux-dev", json=body, timeout=180)
            except httpx.HTTPError as exc:
                outcome["response"] = exc
            outcome["answered_at"] = time.monotonic()

        running = threading.Thread(target=generate)
        running.start()
        wait_until(lambda: jobs_in_flight(url) >= 1, 60, "the job to run on a replica", every=0.1)
        signalled_at = time.monotonic()
        server.send_signal(signal.SIGTERM)
        running.join(180)
        assert server.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
    response = outcome["response"]
    assert isinstance(response, httpx.Response), (response, (tmp_path / "serve.log").read_text()[-3000:])
    assert response.status_code == 200 and len(response.json()["images"]) == 2
    assert outcome["answered_at"] > signalled_at, "the job ended before SIGTERM: nothing was drained"
    time.sleep(1.0)
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [" ".join(p.cmdline())[:120] for p in left]
