"""FLUX.1-schnell over HTTP: `POST /generate/flux-schnell` through the octoai SDK on a `--model tiny-schnell`
server, the other family's route a 404 that names the served model (even before the model loads)."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import openai
import pytest
from conftest import b64_to_image, gradient_image, image_to_b64, pixels
from helpers.engine_control import wait_until
from octoai.core.api_error import ApiError
from octoai.image_gen.errors.unprocessable_entity_error import UnprocessableEntityError

from octoflux.app import build_engine
from octoflux.core.models import configured_family
from octoflux.pipelines.family import FAMILIES, FLUX_DEV, FLUX_SCHNELL

SMALL = dict(width=512, height=512)


@pytest.fixture(scope="module")
def load_gate() -> threading.Event:
    return threading.Event()


@pytest.fixture(scope="module")
def schnell_server(server_factory, tmp_path_factory, load_gate):
    """A `--model tiny-schnell` server whose model loads only once a test opens `load_gate`."""

    def gated_engine(settings, library=None):
        load_gate.wait(120)
        return build_engine(settings, library)

    tiny_dir = tmp_path_factory.mktemp("cache") / "tiny-flux"
    with server_factory(
        model="tiny-schnell", tiny_dir=tiny_dir, engine_factory=gated_engine, wait_ready=False
    ) as live:
        yield live
    load_gate.set()


@pytest.fixture(scope="module")
def schnell(schnell_server, load_gate):
    load_gate.set()
    wait_until(lambda: httpx.get(f"{schnell_server.url}/readyz").status_code == 200, 120, "the model")
    return schnell_server


def test_dev_route_is_404_naming_schnell_before_the_model_has_loaded(schnell_server, load_gate):
    assert not load_gate.is_set()
    assert httpx.get(f"{schnell_server.url}/readyz").status_code == 503
    response = httpx.post(f"{schnell_server.url}/generate/flux-dev", json={"prompt": "a fox"})
    assert response.status_code == 404
    assert (
        "flux-schnell" in response.json()["detail"] and "/generate/flux-schnell" in response.json()["detail"]
    )
    # The schnell route itself says "loading", as every route does then.
    assert (
        httpx.post(f"{schnell_server.url}/generate/flux-schnell", json={"prompt": "a fox"}).status_code == 503
    )


def test_generate_flux_schnell_through_the_sdk(schnell):
    response = schnell.client().image_gen.generate_flux_schnell(
        prompt="a fox", num_images=2, seed=5, steps=1, **SMALL
    )
    assert [item.seed for item in response.images] == [5, 6]
    images = [b64_to_image(item.image_b64) for item in response.images]
    assert all(image.size == (512, 512) for image in images)
    assert [(item.removed_for_safety, item.safety_score) for item in response.images] == [(False, None)] * 2


def test_schnell_defaults_to_4_steps(schnell):
    assert FAMILIES[FLUX_SCHNELL].default_steps == 4
    sdk = schnell.client().image_gen

    def image(**fields):
        return pixels(
            b64_to_image(
                sdk.generate_flux_schnell(prompt="a fox", seed=9, **SMALL, **fields).images[0].image_b64
            )
        )

    default = image()
    assert np.array_equal(default, image(steps=4))
    assert not np.array_equal(default, image(steps=2))


@pytest.mark.parametrize(
    ("field", "value"),
    [("init_image", "IMAGE"), ("mask_image", "IMAGE"), ("strength", 0.5)],
)
def test_image_inputs_on_schnell_are_422_naming_the_field(schnell, field, value):
    if value == "IMAGE":
        value = image_to_b64(gradient_image(64, 64))
    fields = {field: value}
    with pytest.raises(UnprocessableEntityError) as caught:  # each alone: the refusal is about schnell
        schnell.client().image_gen.generate_flux_schnell(prompt="a fox", steps=1, **SMALL, **fields)
    (detail,) = caught.value.body.detail
    assert detail.loc == ["body", field]
    assert "text-to-image only" in detail.msg


@pytest.mark.parametrize("field", ["prompt", "width"])
def test_messages_on_a_schnell_server_name_schnell_not_dev(schnell, field):
    """A bad size, or a field FLUX.1 does not support, is worded for the served model."""
    body = {"prompt": "a fox", "width": 1000, "height": 1000}
    if field == "prompt":
        body = {"prompt": "a fox", "negative_prompt": "blur", **SMALL}
    response = httpx.post(f"{schnell.url}/generate/flux-schnell", json=body, timeout=60)
    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    assert "FLUX.1-dev" not in message
    if field == "width":
        assert "FLUX.1-schnell resolution" in message


def test_dev_route_on_schnell_server_is_404_through_the_sdk(schnell):
    with pytest.raises(ApiError) as caught:
        schnell.client().image_gen.generate_flux_dev(prompt="a fox", steps=1)
    assert caught.value.status_code == 404
    assert "this server serves flux-schnell" in caught.value.body["detail"]


def test_schnell_route_on_dev_server_is_404_naming_dev(live_server):
    response = httpx.post(f"{live_server.url}/generate/flux-schnell", json={"prompt": "a fox"})
    assert response.status_code == 404
    assert "this server serves flux-dev" in response.json()["detail"]
    assert response.json()["detail"] != "Not Found"


def test_schnell_async_through_the_sdk(schnell):
    from octoai.client import OctoAI

    client: OctoAI = schnell.client()
    future = client.infer_async(
        f"{schnell.url}/generate/flux-schnell", {"prompt": "a fox", "steps": 1, **SMALL}
    )
    wait_until(lambda: client.is_future_ready(future), what="the async job")
    result = client.get_future_result(future)
    assert len(result["images"]) == 1 and result["images"][0]["removed_for_safety"] is False


def test_openai_routes_on_schnell(schnell):
    client = openai.OpenAI(base_url=f"{schnell.url}/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["flux-schnell"]
    response = client.images.generate(
        prompt="a fox", model="flux-schnell", size="512x512", extra_body={"steps": 1}
    )
    assert len(response.data) == 1
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", model="flux-dev")
    assert "flux-schnell" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("a.png", b"x", "image/png"), prompt="a fox")
    assert caught.value.body["param"] == "image" and "text-to-image only" in caught.value.body["message"]


# --- the family from the settings, before loading ----------------------------------------------


def test_configured_family_from_names_and_checkpoint_configs(tmp_path, tiny_checkpoint):
    assert configured_family("tiny") == FLUX_DEV
    assert configured_family("random-full") == FLUX_DEV
    assert configured_family("tiny-schnell") == FLUX_SCHNELL
    assert configured_family(tiny_checkpoint) == FLUX_DEV
    schnell_dir = tmp_path / "schnell" / "transformer"
    schnell_dir.mkdir(parents=True)
    (schnell_dir / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    assert configured_family(str(tmp_path / "schnell")) == FLUX_SCHNELL
    # Not knowable without loading: the loaded engine decides.
    assert configured_family(str(tmp_path / "model.safetensors")) is None
    assert configured_family("nobody/not-in-the-cache") is None
