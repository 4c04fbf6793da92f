"""OctoAI's asset library for LoRAs, driven by the unmodified octoai SDK and raw HTTP."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import torch
from conftest import b64_to_image, pixels
from helpers.engine_control import WAIT
from helpers.requests import AUTH, KEY, LORA_DATA, STEPS
from octoai.asset_library import LoraData
from octoai.asset_library.client import OMIT
from octoai.uploading_asset_library import AssetNotReady, UploadingAssetLibraryClient

from octoflux.pipelines.tiny_lora import make_lora, save_diffusers, save_raw


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    """The SDK polls an asset every 10 s; same requests, shorter sleeps."""
    monkeypatch.setattr(UploadingAssetLibraryClient.wait_for_ready, "__defaults__", (0.1, 60, OMIT))


def owned_file(live, name: str):
    """Where an asset KEY uploaded lives: that key's own space of the LoRA folder."""
    return (
        live.settings.lora_dir / ".tenants" / hashlib.sha256(KEY.encode()).hexdigest() / f"{name}.safetensors"
    )


@pytest.fixture(scope="module")
def live(server_factory):
    # 0.05 MB: every tiny LoRA fits, the oversized test file does not.
    with server_factory(api_keys=KEY, max_lora_mb=0.05) as live:
        yield live


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-files")
    return {
        "style": save_diffusers(make_lora(11), folder / "style.safetensors"),
        "detail": save_diffusers(make_lora(12, text_encoder=True), folder / "detail.safetensors"),
        "other": save_diffusers(make_lora(13), folder / "other.safetensors"),
    }


def lora_data():
    return LoraData(engine="image/flux-dev", file_format="safetensors", asset_type="lora")


def image(live, loras=None) -> np.ndarray:
    body = {"prompt": "a red fox", "width": 512, "height": 512, "steps": STEPS, "seed": 5}
    if loras:
        body["loras"] = loras
    response = httpx.post(f"{live.url}/generate/flux-dev", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return pixels(b64_to_image(response.json()["images"][0]["image_b64"]))


def create_body(name: str) -> dict:
    return {"asset_type": "lora", "data": LORA_DATA, "name": name}


def create(live, name: str) -> dict:
    response = httpx.post(f"{live.url}/v1/assets", json=create_body(name), headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def upload(live, name: str, content: bytes) -> dict:
    """The SDK's protocol by hand: create, PUT without a bearer, complete, get."""
    created = create(live, name)
    asset_id = created["asset"]["id"]
    put = httpx.put(created["transfer_api"]["put_url"], content=content)
    if put.status_code == 200:
        done = httpx.post(f"{live.url}/v1/assets/{asset_id}/complete-upload", json={}, headers=AUTH)
        assert done.status_code == 200, done.text
    return httpx.get(f"{live.url}/v1/assets/{asset_id}", headers=AUTH).json()["asset"]


def test_sdk_upload_then_list_get_use_and_delete(live, files):
    client = live.client(KEY)
    base = image(live)
    asset = client.asset_library.create_from_file(
        str(files["style"]), data=lora_data(), name="uploaded-style", description="a test style"
    )
    size = files["style"].stat().st_size
    assert (asset.status, asset.name, asset.size_bytes) == ("ready", "uploaded-style", size)
    assert owned_file(live, "uploaded-style").read_bytes() == files["style"].read_bytes()

    listed = client.asset_library.list()
    assert [a.id for a in listed.data if a.name == "uploaded-style"] == [asset.id]
    assert listed.total == len(listed.data) and not listed.has_more
    for ref in (asset.id, "uploaded-style", "octoai:uploaded-style"):
        got = client.asset_library.get(ref).asset
        assert (got.id, got.status, got.data.engine) == (asset.id, "ready", "image/flux-dev")

    styled = client.image_gen.generate_flux_dev(
        prompt="a red fox", width=512, height=512, steps=STEPS, seed=5, loras={"uploaded-style": 1.0}
    )
    assert np.abs(pixels(b64_to_image(styled.images[0].image_b64)) - base).mean() > 0.3

    deleted = client.asset_library.delete(asset.id)
    assert deleted.id == asset.id
    assert not owned_file(live, "uploaded-style").exists()
    assert all(a.name != "uploaded-style" for a in client.asset_library.list().data)
    body = {"prompt": "x", "width": 512, "height": 512, "steps": STEPS, "loras": {"uploaded-style": 1.0}}
    response = httpx.post(f"{live.url}/generate/flux-dev", json=body, headers=AUTH)
    assert response.status_code == 422 and "uploaded-style" in response.json()["detail"][0]["msg"]


def test_asset_api_needs_the_bearer_but_the_put_url_does_not(live, files):
    assert httpx.get(f"{live.url}/v1/assets").status_code == 401
    body = {"asset_type": "lora", "data": LORA_DATA, "name": "no-auth"}
    assert httpx.post(f"{live.url}/v1/assets", json=body).status_code == 401
    created = create(live, "put-without-bearer")
    assert "Authorization" not in httpx.Request("PUT", created["transfer_api"]["put_url"]).headers
    put = httpx.put(created["transfer_api"]["put_url"], content=files["other"].read_bytes())
    assert put.status_code == 200
    asset_id = created["asset"]["id"]
    assert httpx.post(f"{live.url}/v1/assets/{asset_id}/complete-upload", json={}).status_code == 401


def test_half_written_upload_is_never_a_usable_lora(live, files):
    created = create(live, "half")
    put = httpx.put(created["transfer_api"]["put_url"], content=files["style"].read_bytes())
    assert put.status_code == 200
    # uploaded but not completed: not in the folder, not usable, status says so
    assert not owned_file(live, "half").exists()
    body = {"prompt": "x", "width": 512, "height": 512, "steps": STEPS, "loras": {"half": 1.0}}
    assert httpx.post(f"{live.url}/generate/flux-dev", json=body, headers=AUTH).status_code == 422
    asset = httpx.get(f"{live.url}/v1/assets/half", headers=AUTH).json()["asset"]
    assert asset["status"] == "uploaded"


def _safetensors(state) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def test_rejected_uploads_each_say_why(live):
    good = make_lora(21)
    pickled = io.BytesIO()
    torch.save(good, pickled)
    wrong_keys = {**good, "transformer.not_a_layer.lora_A.weight": torch.zeros(4, 32)}
    wrong_keys["transformer.not_a_layer.lora_B.weight"] = torch.zeros(32, 4)
    wrong_shapes = dict(good)
    wrong_shapes["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(4, 99)
    oversized = {**good, "transformer.proj_out.lora_A.weight": torch.zeros(4, 32)}
    oversized["transformer.proj_out.lora_B.weight"] = torch.zeros(64, 4)
    oversized["transformer.x_embedder.lora_A.weight"] = torch.zeros(200, 64)  # pushes it past 50 KB
    oversized["transformer.x_embedder.lora_B.weight"] = torch.zeros(32, 200)
    cases = {
        "pickled": (pickled.getvalue(), "not a safetensors file"),
        "wrong-keys": (_safetensors(wrong_keys), "does not map onto any linear layer"),
        "wrong-shapes": (_safetensors(wrong_shapes), "does not fit transformer.transformer_blocks.0.attn"),
        "oversized": (_safetensors(oversized), "exceeds the 0.05 MB limit"),
        "not-a-lora": (_safetensors({"transformer.proj_out.weight": torch.zeros(64, 32)}), "not a LoRA"),
    }
    for name, (content, reason) in cases.items():
        asset = upload(live, name, content)
        assert asset["status"] == "rejected", name
        assert reason in asset["status_details"], (name, asset["status_details"])
        assert not owned_file(live, name).exists()


def test_sdk_reports_a_rejected_upload(live, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle, named like a safetensors file
    with pytest.raises(AssetNotReady, match="rejected"):
        live.client(KEY).asset_library.create_from_file(str(path), data=lora_data(), name="bad-pickle")
    assert "not a safetensors file" in live.client(KEY).asset_library.get("bad-pickle").asset.status_details


def test_bad_names_and_formats_are_refused_at_create(live):
    for name in ("../escape", "a/b", "", "x" * 129, "spaced name"):
        body = {"asset_type": "lora", "data": LORA_DATA, "name": name}
        response = httpx.post(f"{live.url}/v1/assets", json=body, headers=AUTH)
        assert response.status_code == 422, name
        assert response.json()["detail"][0]["loc"] == ["body", "name"]
    body = {"asset_type": "lora", "data": {**LORA_DATA, "file_format": "pt"}, "name": "pt-file"}
    response = httpx.post(f"{live.url}/v1/assets", json=body, headers=AUTH)
    assert response.status_code == 422 and "pickle" in response.json()["detail"][0]["msg"]


def test_wrong_or_missing_put_token_is_refused(live, files):
    created = create(live, "token-check")
    put_url = created["transfer_api"]["put_url"]
    base, _, token = put_url.partition("?token=")
    for url in (f"{base}?token={token[:-2]}xx", base):
        response = httpx.put(url, content=files["style"].read_bytes())
        assert response.status_code == 403 and "invalid upload token" in response.json()["detail"]
    assert httpx.put(put_url, content=files["style"].read_bytes()).status_code == 200


def test_expired_put_url_is_refused(server_factory, files):
    with server_factory(api_keys=KEY, lora_upload_ttl_s=0.3, warmup=False) as live:
        created = create(live, "late")
        time.sleep(0.5)
        response = httpx.put(created["transfer_api"]["put_url"], content=files["style"].read_bytes())
        assert response.status_code == 403 and "expired" in response.json()["detail"]


def test_two_concurrent_sdk_uploads(live, files):
    results, errors = {}, []

    def run(name):
        try:
            library = live.client(KEY).asset_library
            results[name] = library.create_from_file(str(files[name]), data=lora_data(), name=f"c-{name}")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("style", "detail")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert {a.status for a in results.values()} == {"ready"}
    for name in ("style", "detail"):
        assert owned_file(live, f"c-{name}").read_bytes() == files[name].read_bytes()
    base = image(live)
    assert np.abs(image(live, {"c-style": 1.0, "c-detail": 1.0}) - base).mean() > 0.3


def test_assets_survive_a_restart_and_hand_placed_files_are_listed(server_factory, files, tmp_path):
    folder, state = tmp_path / "loras", tmp_path / "state"
    with server_factory(api_keys=KEY, lora_dir=folder, state_dir=state, warmup=False) as live:
        library = live.client(KEY).asset_library
        asset = library.create_from_file(str(files["style"]), data=lora_data(), name="kept")
    save_raw(make_lora(31), folder / "by-hand.safetensors")
    assert not (folder / ".assets.json").exists()  # records live in the state store, not the folder
    with server_factory(api_keys=KEY, lora_dir=folder, state_dir=state, warmup=False) as live:
        client = live.client(KEY)
        assert client.asset_library.get("kept").asset.id == asset.id
        by_hand = client.asset_library.get("by-hand").asset
        assert (by_hand.status, by_hand.id) == ("ready", "file_by-hand")
        assert {a.name for a in client.asset_library.list().data} == {"kept", "by-hand"}


def test_concurrent_complete_upload_of_one_asset_publishes_once_and_never_500s(live, files):
    created = create(live, "raced")
    asset_id = created["asset"]["id"]
    assert (
        httpx.put(created["transfer_api"]["put_url"], content=files["other"].read_bytes()).status_code == 200
    )
    url = f"{live.url}/v1/assets/{asset_id}/complete-upload"
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(httpx.post(url, json={}, headers=AUTH).status_code))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses)[0] == 200 and set(statuses) <= {200, 409}, statuses
    assert httpx.get(f"{live.url}/v1/assets/{asset_id}", headers=AUTH).json()["asset"]["status"] == "ready"


def test_two_replicas_share_records_names_and_validation_claims(tmp_path, files):
    from octoflux.assets.store import AssetConflict, AssetStore
    from octoflux.pipelines.loras import LoraLibrary
    from octoflux.state.store import open_state_store

    url = f"sqlite:///{tmp_path}/state.db"
    stores = [open_state_store(url), open_state_store(url)]
    a, b = (AssetStore(LoraLibrary(tmp_path / "loras"), 60, store) for store in stores)
    created, token = a.create("shared", "", LORA_DATA)
    assert [x["id"] for x in b.all()] == [created["id"]]
    with pytest.raises(AssetConflict, match="already exists"):
        b.create("shared", "", LORA_DATA)
    b.authorize(created["id"], token)
    b.begin_upload(created["id"])
    temp = b.temp_file(created["id"])
    temp.write_bytes(files["style"].read_bytes())
    b.finish_upload(created["id"], temp, temp.stat().st_size)
    a.begin_validation(created["id"])
    with pytest.raises(AssetConflict, match="being validated"):
        b.begin_validation(created["id"])
    assert b.find("shared")["status"] == "uploaded"  # clients never see the stored "validating"
    a.publish(created["id"])
    assert b.find(created["id"])["status"] == "ready"
    for store in stores:
        store.close()


def test_a_store_failing_as_a_lora_is_published_leaves_no_file_in_the_folder_and_keeps_the_upload(
    tmp_path, files
):
    from octoflux.assets.store import AssetStore
    from octoflux.pipelines.loras import LoraLibrary
    from octoflux.state.store import StateStoreError, open_state_store

    state = open_state_store(f"sqlite:///{tmp_path}/state.db")
    library = LoraLibrary(tmp_path / "loras")
    assets = AssetStore(library, 60, state)
    created, token = assets.create("kept", "", LORA_DATA)
    asset_id = created["id"]
    assets.authorize(asset_id, token)
    assets.begin_upload(asset_id)
    temp = assets.temp_file(asset_id)
    temp.write_bytes(files["style"].read_bytes())
    assets.finish_upload(asset_id, temp, temp.stat().st_size)
    assets.begin_validation(asset_id)

    def failing_update(*args, **kwargs):
        raise StateStoreError("SQLite state failed: disk I/O error")

    state.update_asset, update_asset = failing_update, state.update_asset
    with pytest.raises(StateStoreError):
        assets.publish(asset_id)
    # Not in the folder (it would be listed as a hand-placed file_kept), still staged for a retry.
    assert not library.path("kept").exists() and assets.staging_file(asset_id).exists()
    state.update_asset = update_asset
    assets.publish(asset_id)
    assert assets.find(asset_id)["status"] == "ready" and library.path("kept").exists()
    assert not assets.staging_file(asset_id).exists()
    state.close()


ASSET_STATE_CALLS = ("create_asset", "get_asset", "list_assets", "update_asset", "delete_asset")


def asset_request(live, files, route: str) -> tuple[str, str, dict]:
    """`(method, url, httpx arguments)` of one asset route, with an asset in the state it needs."""
    name = f"held-{route}"
    if route == "create":
        return "POST", f"{live.url}/v1/assets", {"json": create_body(name), "headers": AUTH}
    if route == "list":
        return "GET", f"{live.url}/v1/assets", {"headers": AUTH}
    created = create(live, name)
    asset_url = f"{live.url}/v1/assets/{created['asset']['id']}"
    if route in ("get", "delete"):
        return route.upper(), asset_url, {"headers": AUTH}
    content = files["style"].read_bytes()
    if route == "upload":
        return "PUT", created["transfer_api"]["put_url"], {"content": content}
    assert httpx.put(created["transfer_api"]["put_url"], content=content).status_code == 200
    if route == "complete-upload":
        return "POST", f"{asset_url}/complete-upload", {"json": {}, "headers": AUTH}
    done = httpx.post(f"{asset_url}/complete-upload", json={}, headers=AUTH)
    assert done.status_code == 200 and done.json()["error"] is None, done.text
    return "GET", created["transfer_api"]["get_url"], {}


def held_until(release: threading.Event, entered: threading.Event, call: Callable) -> Callable:
    """`call`, but it first waits for `release`, as behind a SQLite lock another process holds."""

    def held(*args, **kwargs):
        entered.set()
        release.wait(WAIT)
        return call(*args, **kwargs)

    return held


@pytest.mark.parametrize(
    "route", ["create", "list", "get", "delete", "upload", "download", "complete-upload"]
)
def test_healthz_answers_while_an_asset_request_waits_on_the_state_store(live, files, monkeypatch, route):
    method, url, arguments = asset_request(live, files, route)
    entered, release, healthz_done = threading.Event(), threading.Event(), threading.Event()
    for call in ASSET_STATE_CALLS:
        state = live.service.state
        monkeypatch.setattr(state, call, held_until(release, entered, getattr(state, call)))
    answers: dict[str, httpx.Response] = {}

    def send_asset_request():
        answers["asset"] = httpx.request(method, url, timeout=2 * WAIT, **arguments)

    def probe_healthz():
        answers["healthz"] = httpx.get(f"{live.url}/healthz", timeout=2 * WAIT)
        healthz_done.set()

    asset_thread = threading.Thread(target=send_asset_request)
    asset_thread.start()
    try:
        assert entered.wait(WAIT), f"the {route} request never reached the state store"
        threading.Thread(target=probe_healthz, daemon=True).start()
        answered_while_held = healthz_done.wait(WAIT)
    finally:
        release.set()
        asset_thread.join(2 * WAIT)
    assert answered_while_held, f"/healthz waited for the {route} request's state-store call"
    assert answers["healthz"].status_code == 200
    assert answers["asset"].status_code == 200, answers["asset"].text
