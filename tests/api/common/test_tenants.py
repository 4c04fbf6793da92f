"""Named keys from `--api-keys-file`: scopes, assets per key, shared LoRAs, quotas, gated metrics.

One server for the module, its engine driven by `control` so quota tests can hold jobs running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import httpx
import numpy as np
import pytest
from conftest import b64_to_image, pixels
from helpers.engine_control import wait_until
from helpers.requests import ASYNC, LORA_DATA, URL_PATH, body

from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

KEYS = {
    "team-a": "sk-team-a-0123456789",
    "team-b": "sk-team-b-0123456789",
    "team-c": "sk-team-c-0123456789",
    "ops": "sk-ops-0123456789",
    "painter": "sk-painter-0123456789",
    "scraper": "sk-scraper-0123456789",
}
KEYS_FILE = f"""
[[keys]]
name = "team-a"
secret = "{KEYS["team-a"]}"
scopes = ["generate", "assets"]
max_queued = 2

[[keys]]
name = "team-b"
secret_sha256 = "{hashlib.sha256(KEYS["team-b"].encode()).hexdigest()}"
scopes = ["generate", "assets"]

[[keys]]
name = "team-c"
secret = "{KEYS["team-c"]}"
scopes = ["generate"]
images_per_minute = 2

[[keys]]
name = "ops"
secret = "{KEYS["ops"]}"
scopes = ["admin"]

[[keys]]
name = "painter"
secret = "{KEYS["painter"]}"
scopes = ["generate"]

[[keys]]
name = "scraper"
secret = "{KEYS["scraper"]}"
scopes = ["metrics"]
"""


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenant-lora-files")
    return {
        seed: save_diffusers(make_lora(seed), folder / f"l{seed}.safetensors") for seed in (41, 42, 43, 44)
    }


@pytest.fixture(scope="module")
def server(server_factory, control, tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("tenant-keys")
    (folder / "keys.toml").write_text(KEYS_FILE)
    lora_dir = tmp_path_factory.mktemp("tenant-loras")
    (lora_dir / "by-hand.safetensors").write_bytes(files[43].read_bytes())
    with server_factory(
        engine_factory=control.factory, warmup=False, api_keys_file=folder / "keys.toml", lora_dir=lora_dir
    ) as live:
        yield live


pytestmark = pytest.mark.usefixtures("controlled")


def upload(server, key: str, name: str, content: bytes) -> dict:
    """Create, PUT (no bearer), complete; the asset as its creator sees it."""
    created = httpx.post(
        f"{server.url}/v1/assets",
        json={"asset_type": "lora", "data": LORA_DATA, "name": name},
        headers=auth(key),
    )
    assert created.status_code == 200, created.text
    asset_id = created.json()["asset"]["id"]
    assert httpx.put(created.json()["transfer_api"]["put_url"], content=content).status_code == 200
    done = httpx.post(f"{server.url}/v1/assets/{asset_id}/complete-upload", json={}, headers=auth(key))
    assert done.status_code == 200 and done.json()["error"] is None, done.text
    return httpx.get(f"{server.url}/v1/assets/{asset_id}", headers=auth(key)).json()["asset"]


def listed(server, key: str) -> list[dict]:
    response = httpx.get(f"{server.url}/v1/assets", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()["data"]


def generate(server, key: str, loras: dict[str, float] | None = None, **extra) -> httpx.Response:
    payload = body("a lighthouse", **({"loras": loras} if loras else {}), **extra)
    return httpx.post(f"{server.url}{URL_PATH}", json=payload, headers=auth(key), timeout=60)


def image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return pixels(b64_to_image(response.json()["images"][0]["image_b64"]))


def test_another_key_cannot_list_get_use_or_delete_an_asset(server, files):
    asset = upload(server, "team-a", "a-private", files[41].read_bytes())
    assert asset["status"] == "ready"

    assert "a-private" not in {a["name"] for a in listed(server, "team-b")}
    for ref in (asset["id"], "a-private"):
        assert httpx.get(f"{server.url}/v1/assets/{ref}", headers=auth("team-b")).status_code == 404
    refused = generate(server, "team-b", {"a-private": 1.0})
    assert refused.status_code == 422 and "unknown LoRA 'a-private'" in refused.text
    assert httpx.delete(f"{server.url}/v1/assets/{asset['id']}", headers=auth("team-b")).status_code == 404

    # Still A's, whole: listed and usable by A.
    assert "a-private" in {a["name"] for a in listed(server, "team-a")}
    assert generate(server, "team-a", {"a-private": 1.0}).status_code == 200


def test_two_keys_each_own_an_asset_of_the_same_name(server, files):
    mine = upload(server, "team-a", "style", files[41].read_bytes())
    theirs = upload(server, "team-b", "style", files[42].read_bytes())
    assert mine["id"] != theirs["id"]
    for key, asset in (("team-a", mine), ("team-b", theirs)):
        assert [a["id"] for a in listed(server, key) if a["name"] == "style"] == [asset["id"]]
        got = httpx.get(f"{server.url}/v1/assets/style", headers=auth(key)).json()["asset"]
        assert got["id"] == asset["id"]
    # Each key's "style" is its own file: the same request gives each key a different image.
    assert not np.array_equal(
        image(generate(server, "team-a", {"style": 1.0})), image(generate(server, "team-b", {"style": 1.0}))
    )


def test_a_shared_lora_is_usable_by_every_key_and_deleted_only_by_admin(server, files):
    shared = upload(server, "ops", "house-style", files[44].read_bytes())
    assert shared["is_public"] is True
    for key in ("team-a", "team-b"):
        names = {a["name"] for a in listed(server, key)}
        assert {"house-style", "by-hand"} <= names
        assert generate(server, key, {"house-style": 1.0}).status_code == 200
    assert generate(server, "team-b", {"by-hand": 1.0}).status_code == 200

    for ref in (shared["id"], "file_by-hand"):
        refused = httpx.delete(f"{server.url}/v1/assets/{ref}", headers=auth("team-a"))
        assert refused.status_code == 403, refused.text
        assert "only an admin key" in refused.json()["detail"]
    assert httpx.get(f"{server.url}/v1/assets/{shared['id']}", headers=auth("team-a")).status_code == 200

    assert httpx.delete(f"{server.url}/v1/assets/{shared['id']}", headers=auth("ops")).status_code == 200
    assert not (server.settings.lora_dir / "house-style.safetensors").exists()
    gone = generate(server, "team-a", {"house-style": 1.0})
    assert gone.status_code == 422 and "unknown LoRA" in gone.text


def test_a_key_without_the_scope_gets_403_in_each_dialects_shape(server):
    no_assets = httpx.get(f"{server.url}/v1/assets", headers=auth("painter"))
    assert no_assets.status_code == 403
    assert "'assets' scope" in no_assets.json()["detail"]

    no_generate = generate(server, "scraper")
    assert no_generate.status_code == 403
    assert "'generate' scope" in no_generate.json()["detail"]

    openai = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": "a lighthouse", "size": "512x512"},
        headers=auth("scraper"),
    )
    assert openai.status_code == 403
    assert "'generate' scope" in openai.json()["error"]["message"]

    assert generate(server, "painter").status_code == 200


def test_the_access_log_line_names_the_key_never_its_secret(server, caplog):
    caplog.set_level(logging.INFO, logger="octoflux.access")
    listed(server, "team-b")
    httpx.get(f"{server.url}/v1/assets", headers={**auth("painter"), "X-Request-ID": "painter-refused"})

    def line_of(request_id: str | None = None) -> dict | None:
        for record in caplog.records:
            if record.name == "octoflux.access":
                line = json.loads(record.getMessage())
                if (request_id is None and line.get("key") == "team-b") or line["request_id"] == request_id:
                    return line
        return None

    assert wait_until(line_of)["path"] == "/v1/assets"
    assert wait_until(lambda: line_of("painter-refused"))["key"] == "painter"
    assert not any(secret in caplog.text for secret in KEYS.values())


def post_async(server, key: str, prompt: str, headers: dict | None = None, **extra) -> httpx.Response:
    payload = body(prompt, **extra)
    sent = {**auth(key), **ASYNC, **(headers or {})}
    return httpx.post(f"{server.url}{URL_PATH}", json=payload, headers=sent, timeout=30)


def test_max_queued_gives_that_key_429_with_retry_after_and_others_go_on(server, controlled):
    controlled.hold("a-running")
    keyed = {"Idempotency-Key": "a-waiting-1"}
    accepted = [post_async(server, "team-a", "a-running"), post_async(server, "team-a", "a-waiting", keyed)]
    assert [r.status_code for r in accepted] == [202, 202]
    assert controlled.reached["a-running"].wait(30)

    refused = post_async(server, "team-a", "a-third")
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "max_queued 2" in refused.json()["detail"]
    # A client that lost its 202 retries with its key: it gets its job, which holds one of the two places.
    retried = post_async(server, "team-a", "a-waiting", keyed)
    assert (retried.status_code, retried.json()) == (202, accepted[1].json())
    sync_refused = generate(server, "team-a")
    assert sync_refused.status_code == 429

    other = post_async(server, "team-b", "b-meanwhile")
    assert other.status_code == 202

    cancel(server, "team-a", accepted[1])  # a waiting job cancelled gives its slot back at once
    after = post_async(server, "team-a", "a-after")
    assert after.status_code == 202
    for key, response in (("team-a", accepted[0]), ("team-a", after), ("team-b", other)):
        cancel(server, key, response)


def test_images_per_minute_gives_that_key_429_with_retry_after_and_others_go_on(server, controlled):
    controlled.hold("c-first")
    first = post_async(server, "team-c", "c-first", num_images=2)
    assert first.status_code == 202
    refused = post_async(server, "team-c", "c-second")
    assert refused.status_code == 429
    # The window frees the first two images a minute after they were admitted.
    assert 50 <= int(refused.headers["Retry-After"]) <= 60
    assert "images_per_minute 2" in refused.json()["detail"]
    other = post_async(server, "team-a", "a-meanwhile")
    assert other.status_code == 202
    cancel(server, "team-c", first)
    cancel(server, "team-a", other)


def cancel(server, key: str, accepted: httpx.Response) -> None:
    deleted = httpx.delete(f"{server.url}/v1/responses/{accepted.json()['response_id']}", headers=auth(key))
    assert deleted.status_code == 200, deleted.text


def images_of(server, key: str) -> float:
    """The key's `octoflux_key_images_total`, as the scraper key reads it (0 before its first request)."""
    text = httpx.get(f"{server.url}/metrics", headers=auth("scraper")).text
    found = re.search(rf'^octoflux_key_images_total{{key="{key}"}} (\S+)$', text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def test_metrics_and_probe_details_need_a_metrics_or_admin_key(server):
    url = server.url
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers=auth("team-a")).status_code == 403
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}
    before = images_of(server, "painter")
    assert generate(server, "painter", num_images=2).status_code == 200
    assert images_of(server, "painter") == before + 2
    for key in ("scraper", "ops"):
        text = httpx.get(f"{url}/metrics", headers=auth(key)).text
        assert 'octoflux_key_images_total{key="painter"}' in text
        assert not any(secret in text for secret in KEYS.values())
        assert "pid" in httpx.get(f"{url}/healthz", headers=auth(key)).json()
        assert "model" in httpx.get(f"{url}/readyz", headers=auth(key)).json()


def test_public_metrics_opens_metrics_and_probe_details_to_anyone(server, monkeypatch):
    monkeypatch.setattr(server.settings, "public_metrics", True)
    assert "octoflux_queue_depth" in httpx.get(f"{server.url}/metrics").text
    assert "pid" in httpx.get(f"{server.url}/healthz").json()
    assert httpx.get(f"{server.url}/v1/assets").status_code == 401  # the rest still needs a key


def test_whoami_names_the_key_its_scopes_and_limits_never_the_secret(server):
    assert httpx.get(f"{server.url}/v1/whoami").status_code == 401
    assert httpx.get(f"{server.url}/v1/whoami", headers=auth("team-a")).json() == {
        "auth": True,
        "name": "team-a",
        "scopes": ["assets", "generate"],
        "max_queued": 2,
        "images_per_minute": None,
    }
    assert httpx.get(f"{server.url}/v1/whoami", headers=auth("scraper")).json()["scopes"] == ["metrics"]
