"""Errors answered outside a dialect's own routes still take the shape of the API the path belongs to."""

from __future__ import annotations

import httpx
import pytest

from octoflux.api.common.deps import get_service


@pytest.fixture
def broken_service(live_server):
    """Every route that needs the service fails with an error no handler knows (a bug, not a domain error)."""

    def broken():
        raise KeyError("bug")

    overrides = live_server.app.dependency_overrides
    overrides[get_service] = broken
    yield live_server
    overrides.pop(get_service)


def post(server, path: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"prompt": "a kite"}, timeout=30)


def test_unhandled_error_is_a_500_in_the_shape_of_the_paths_api(broken_service):
    openai_side = post(broken_service, "/v1/images/generations")
    octoai_side = post(broken_service, "/generate/flux-dev")
    for response in (openai_side, octoai_side):
        assert response.status_code == 500 and response.headers["x-request-id"]
        assert response.headers["content-type"] == "application/json"
    assert openai_side.json() == {
        "error": {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": "internal",
        }
    }
    assert octoai_side.json() == {"detail": "internal server error"}
