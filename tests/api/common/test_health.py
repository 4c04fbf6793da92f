"""Liveness and readiness: /readyz is 503 until the pipeline is loaded and warmed, then 200."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from octoflux.app import build_engine

BODY = {"prompt": "a red fox", "width": 512, "height": 512, "steps": 1, "seed": 1}


def test_healthz_is_200(live_server):
    response = httpx.get(f"{live_server.url}/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_is_200_once_loaded(live_server):
    response = httpx.get(f"{live_server.url}/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_readyz_is_503_until_the_pipeline_is_loaded_then_200(server_factory):
    may_load = threading.Event()

    def slow_engine(settings, library):
        assert may_load.wait(60)
        return build_engine(settings, library)

    with server_factory(wait_ready=False, engine_factory=slow_engine) as live:
        try:
            assert httpx.get(f"{live.url}/healthz").status_code == 200
            not_ready = httpx.get(f"{live.url}/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["status"] == "not ready"
            early = httpx.post(f"{live.url}/generate/flux-dev", json=BODY)
            assert early.status_code == 503
            assert int(early.headers["retry-after"]) > 0
            invalid = httpx.post(f"{live.url}/generate/flux-dev", json={**BODY, "steps": 0})
            assert invalid.status_code == 422  # validation still answers while loading
        finally:
            may_load.set()
        deadline = time.monotonic() + 60
        while (ready := httpx.get(f"{live.url}/readyz")).status_code != 200:
            assert ready.status_code == 503
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(f"{live.url}/generate/flux-dev", json=BODY, timeout=60).status_code == 200


def test_readyz_reports_a_failed_load(server_factory):
    def broken_engine(settings, library):
        raise RuntimeError("weights are corrupt")

    with server_factory(wait_ready=False, engine_factory=broken_engine) as live:
        deadline = time.monotonic() + 30
        while "failed" not in (detail := httpx.get(f"{live.url}/readyz").json()["detail"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "weights are corrupt" in detail
        assert httpx.get(f"{live.url}/readyz").status_code == 503
        assert httpx.post(f"{live.url}/generate/flux-dev", json=BODY).status_code == 503
        # Liveness stays 200 (a restart would not fix bad weights) but says why it is not ready.
        health = httpx.get(f"{live.url}/healthz")
        assert health.status_code == 200
        assert health.json()["ready"] is False
        assert "weights are corrupt" in health.json()["load_error"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_get_only(live_server, path):
    assert httpx.post(f"{live_server.url}{path}").status_code == 405
