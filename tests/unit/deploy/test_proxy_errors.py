"""Ray's proxy: an answer no replica wrote is replaced by one in the shape of the API the path belongs to."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("ray.serve")

from octoflux.deploy.replicas import REPLICA_LOST, ProxyErrors  # noqa: E402

OPENAI_PATH = "/v1/images/generations"
OCTOAI_PATH = "/generate/flux-dev"


def ray_answers(status: int, body: bytes):
    """An inner app standing for Ray's proxy: it answers itself, without X-OctoFlux-Replica."""

    async def app(scope, receive, send):
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def replica_died(scope, receive, send):
    raise RuntimeError("ActorDiedError: the actor died unexpectedly before finishing this task")


def post(inner, path: str) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=ProxyErrors(inner))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.post(path, json={"prompt": "a kite"})

    return asyncio.run(call())


def test_ray_backpressure_is_a_429_with_retry_after_in_each_paths_shape():
    openai_side = post(ray_answers(503, b"Request dropped due to backpressure"), OPENAI_PATH)
    octoai_side = post(ray_answers(429, b""), OCTOAI_PATH)
    for response in (openai_side, octoai_side):
        assert response.status_code == 429 and response.headers["retry-after"] == "5"
    busy = "server busy: every replica's queue is full; retry"
    assert openai_side.json() == {
        "error": {"message": busy, "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    }
    assert octoai_side.json() == {"detail": busy}


def test_no_replica_ready_is_a_503_in_each_paths_shape():
    openai_side = post(ray_answers(503, b"Service Unavailable"), OPENAI_PATH)
    octoai_side = post(ray_answers(503, b"Service Unavailable"), OCTOAI_PATH)
    assert (openai_side.status_code, octoai_side.status_code) == (503, 503)
    error = openai_side.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "not_ready") and "no replica" in error[
        "message"
    ]
    assert octoai_side.json() == {"detail": "no replica is ready to serve; retry"}


def test_replica_lost_mid_request_is_a_503_in_each_paths_shape():
    openai_side = post(replica_died, OPENAI_PATH)
    octoai_side = post(replica_died, OCTOAI_PATH)
    assert (openai_side.status_code, octoai_side.status_code) == (503, 503)
    assert openai_side.json() == {
        "error": {"message": REPLICA_LOST, "type": "server_error", "param": None, "code": "worker_lost"}
    }
    assert octoai_side.json() == {"detail": REPLICA_LOST} and "ray" not in octoai_side.text.lower()


def test_the_error_shapes_load_without_torch():
    # Ray's proxy imports ProxyErrors and the dialects' renderers; it must not pay for torch.
    code = (
        "import sys\n"
        "import octoflux.deploy.replicas, octoflux.api.common.dialects, octoflux.core.errors\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
