"""A failing job fails alone: the server answers the next request, within seconds, every time."""

from __future__ import annotations

import httpx
import pytest
import torch
from helpers.engine_control import WAIT
from helpers.requests import URL_PATH, body

pytestmark = pytest.mark.usefixtures("controlled")


@pytest.fixture(scope="module")
def server(controlled_server):
    return controlled_server


def fail_once(exc: BaseException):
    raised = []

    def fault(spec):
        if not raised:
            raised.append(spec)
            raise exc

    return fault


def assert_still_serving(server) -> None:
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    response = httpx.post(f"{server.url}{URL_PATH}", json=body("next"), timeout=WAIT)
    assert response.status_code == 200 and len(response.json()["images"]) == 1


def test_pipeline_exception_fails_only_that_job_with_a_500_and_no_traceback(server, control):
    control.fault = fail_once(RuntimeError("injected fault in the transformer"))
    response = httpx.post(f"{server.url}{URL_PATH}", json=body("doomed"), timeout=WAIT)
    assert response.status_code == 500
    detail = response.json()["detail"]
    assert "injected fault in the transformer" in detail
    assert "Traceback" not in response.text and "File " not in response.text
    assert_still_serving(server)


def test_out_of_memory_gives_503_suggesting_fewer_images_frees_the_cache_and_recovers(server, control):
    control.fault = fail_once(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    response = httpx.post(f"{server.url}{URL_PATH}", json=body("huge", num_images=4), timeout=WAIT)
    assert response.status_code == 503
    assert "fewer images" in response.json()["detail"]
    assert control.memory_freed >= 1
    assert_still_serving(server)


def test_oom_in_a_later_batch_still_fails_cleanly(server, control):
    calls = []

    def second_batch_oom(spec):
        calls.append(spec)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")

    control.fault = second_batch_oom
    server.service.engine.max_batch = 1
    try:
        response = httpx.post(f"{server.url}{URL_PATH}", json=body("two", num_images=2), timeout=WAIT)
    finally:
        server.service.engine.max_batch = 4
    assert response.status_code == 503
    control.fault = None
    assert_still_serving(server)


def test_unexpected_error_in_the_http_layer_is_a_json_500_with_a_request_id(server, monkeypatch):
    from octoflux.core import generation

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(generation, "build_spec", broken)
    response = httpx.post(f"{server.url}{URL_PATH}", json=body("x"), timeout=WAIT)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert response.headers["x-request-id"]
    monkeypatch.undo()
    assert_still_serving(server)
