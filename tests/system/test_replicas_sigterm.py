"""`octoflux serve --max-replicas 1 --context-parallel 2` as a user runs it: one Ray replica of two gloo
ranks gives one process's pixels, sync and async, through Ray's proxy and the state store; a rank
killed makes Ray replace the whole replica; SIGTERM finishes the running request, exits 0 and leaves
no process behind, Ray's or a rank's. Its own module, so no other Ray instance runs beside it."""

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
import numpy as np
import psutil
import pytest
from conftest import LiveServer, b64_to_image, pixels
from helpers.engine_control import wait_until
from helpers.requests import ASYNC, body
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


def rank_followers(server: subprocess.Popen) -> list[psutil.Process]:
    """The context-parallel ranks 1..N-1 running under this `octoflux serve` (children of its replica)."""
    below = psutil.Process(server.pid).children(recursive=True)
    return [p for p in below if p.is_running() and "octoflux.deploy.rank_follower" in " ".join(p.cmdline())]


def replica_serving(url: str) -> str | None:
    """The replica answering through the proxy once it is ready to serve; None while none is."""
    try:
        if httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            return None
        return httpx.get(f"{url}/healthz", timeout=5).json()["replica"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def fox(url: str) -> np.ndarray:
    """One image through the OctoAI SDK, as users call it."""
    client = LiveServer(url=url, app=None, settings=None).client()
    response = client.image_gen.generate_flux_dev(prompt="a red fox", width=512, height=512, steps=2, seed=7)
    return pixels(b64_to_image(response.images[0].image_b64))


def async_fox(url: str) -> np.ndarray:
    """The same image as an async job: stored, leased by the replica, polled through the proxy."""
    request = {"prompt": "a red fox", "width": 512, "height": 512, "steps": 2, "seed": 7}
    accepted = httpx.post(f"{url}/generate/flux-dev", json=request, headers=ASYNC, timeout=30).json()
    poll = accepted["poll_url"]
    wait_until(lambda: httpx.get(poll, timeout=10).json()["status"] == "completed", 60, "the job", every=0.2)
    result = httpx.get(f"{poll}/result", timeout=10).json()
    return pixels(b64_to_image(result["images"][0]["image_b64"]))


@pytest.mark.timeout(300)
def test_a_replica_of_two_ranks_serves_one_process_s_pixels_and_sigterm_leaves_no_process(
    tiny_checkpoint, live_server, tmp_path
):
    port = free_port()
    # --max-replicas: one replica on Ray Serve (a plain --replicas 1 serves without Ray).
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--max-replicas", "1"]
    command += ["--context-parallel", "2", "--device", "cpu", "--model", tiny_checkpoint, "--port", str(port)]
    command += ["--state-dir", str(tmp_path / "state"), "--lora-dir", str(tmp_path), "--warmup-steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_replicas(url, 1)
        family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        assert any("raylet" in " ".join(p.cmdline()) for p in family if p.is_running())
        (rank,) = rank_followers(server)

        # One process's pixels (within 1/255: the ranks sum attention in another order).
        alone = fox(live_server.url)
        for split in (fox(url), async_fox(url)):
            assert np.abs(split.astype(int) - alone.astype(int)).max() <= 1

        # A lost rank fails the replica's health check: Ray replaces the whole replica, ranks included.
        lost_replica = httpx.get(f"{url}/healthz", timeout=5).json()["replica"]
        rank.kill()
        wait_until(lambda: replica_serving(url) not in (None, lost_replica), 120, "a new replica", every=0.2)
        (new_rank,) = rank_followers(server)
        assert new_rank.pid != rank.pid
        assert np.abs(fox(url).astype(int) - alone.astype(int)).max() <= 1
        family += psutil.Process(server.pid).children(recursive=True)  # the old replica's must be gone too

        outcome: dict = {}
        # 100 steps of 2 images: several seconds of work on the two ranks here, more than the 2 s it
        # may take the replica to report the job running, after which SIGTERM follows at once.
        long_job = body("a long one", steps=100, num_images=2)

        def generate() -> None:
            try:
                outcome["response"] = httpx.post(f"{url}/generate/flux-dev", json=long_job, timeout=180)
            except httpx.HTTPError as exc:
                outcome["response"] = exc
            outcome["answered_at"] = time.monotonic()

        running = threading.Thread(target=generate)
        running.start()
        wait_until(lambda: jobs_in_flight(url) >= 1, 60, "the job to run on the replica", every=0.1)
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
