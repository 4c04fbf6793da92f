"""Bearer-token auth against OCTOFLUX_API_KEYS, and refusing open non-loopback binds."""

from __future__ import annotations

import httpx
import pytest
from conftest import b64_to_image
from octoai.core.api_error import ApiError

from octoflux.settings import Settings

GOOD = {"prompt": "a red fox", "width": 512, "height": 512, "steps": 1, "seed": 1}


@pytest.fixture(scope="module")
def keyed(server_factory):
    with server_factory(api_keys="k1, k2") as live:
        yield live


def post(live, headers: dict[str, str], body: dict = GOOD) -> httpx.Response:
    return httpx.post(f"{live.url}/generate/flux-dev", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer k1k2"},
        {"Authorization": "Bearer k"},
        {"Authorization": "Bearer k1, k2"},
        {"Authorization": "Basic k1"},
        {"Authorization": "Token k1"},
        {"Authorization": "k1"},
        {"X-API-Key": "k1"},
    ],
    ids=[
        "none",
        "wrong",
        "empty",
        "concatenated",
        "prefix",
        "the-list",
        "basic",
        "token",
        "no-scheme",
        "other-header",
    ],
)
def test_missing_or_invalid_token_is_401_with_www_authenticate(keyed, headers):
    response = post(keyed, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "detail" in response.json()


@pytest.mark.parametrize("token", ["k1", "k2"])
def test_either_key_is_accepted(keyed, token):
    response = post(keyed, {"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert b64_to_image(response.json()["images"][0]["image_b64"]).size == (512, 512)


def test_scheme_is_case_insensitive(keyed):
    assert post(keyed, {"Authorization": "bearer k1"}).status_code == 200


def test_unauthenticated_invalid_request_is_401_not_422(keyed):
    """Without a token nothing about validation leaks out."""
    assert post(keyed, {}, {"prompt": "", "steps": 0}).status_code == 401


def test_sdk_with_good_key_works(keyed):
    response = keyed.client(api_key="k2").image_gen.generate_flux_dev(
        prompt="a red fox", width=512, height=512, steps=1, seed=3
    )
    assert response.images[0].seed == 3
    assert b64_to_image(response.images[0].image_b64).size == (512, 512)


def test_sdk_with_bad_key_gets_401(keyed):
    with pytest.raises(ApiError) as caught:
        keyed.client(api_key="nope").image_gen.generate_flux_dev(prompt="a red fox", width=512, height=512)
    assert caught.value.status_code == 401


def test_probes_need_no_token(keyed):
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200
    assert httpx.get(f"{keyed.url}/readyz").status_code == 200


def test_open_server_needs_no_token(live_server):
    assert post(live_server, {}).status_code == 200


# --- refusing to serve openly on a non-loopback address ------------------------------------------


@pytest.fixture
def no_env_keys(monkeypatch):
    for name in ("OCTOFLUX_API_KEYS", "OCTOFLUX_ALLOW_UNAUTHENTICATED", "OCTOFLUX_HOST"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_non_loopback_bind_without_keys_refuses_to_start(no_env_keys, host):
    with pytest.raises(SystemExit) as caught:
        Settings(host=host).check_auth_exposure()
    assert "OCTOFLUX_API_KEYS" in str(caught.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_non_loopback_bind_with_keys_or_explicit_opt_out_starts(no_env_keys, host):
    Settings(host=host, api_keys="k1").check_auth_exposure()
    Settings(host=host, allow_unauthenticated=True).check_auth_exposure()


def test_keys_of_only_commas_and_spaces_count_as_none(no_env_keys):
    with pytest.raises(SystemExit):
        Settings(host="0.0.0.0", api_keys=" , ,").check_auth_exposure()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_bind_without_keys_starts(no_env_keys, host):
    Settings(host=host).check_auth_exposure()


def test_api_keys_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("OCTOFLUX_API_KEYS", "alpha, beta,,")
    assert Settings().api_key_list == ["alpha", "beta"]
    Settings(host="0.0.0.0").check_auth_exposure()


def test_serve_refuses_open_non_loopback_bind_before_starting(no_env_keys):
    from octoflux.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["serve", "--host", "0.0.0.0", "--port", "1"])
    assert "--allow-unauthenticated" in str(caught.value)
