"""`--safety-checker` over HTTP: `removed_for_safety` and `safety_score` on every OctoAI mode (sync and
async) and on the OpenAI routes, both outcomes driven by the tiny checker's thresholds."""

from __future__ import annotations

import io

import numpy as np
import openai
import pytest
from conftest import b64_to_image, gradient_image, image_to_b64
from helpers.engine_control import wait_until
from PIL import Image

from octoflux import cli

NEVER_FLAGS, ALWAYS_FLAGS = 1.0, -1.0  # every concept's threshold; cosine similarity lies in [-1, 1]
SMALL = dict(width=512, height=512, steps=1, seed=3)
INIT = gradient_image(512, 512)


def half_mask() -> Image.Image:
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (256, 0, 512, 512))
    return mask


MODES = {
    "text2img": {},
    "img2img": {"init_image": image_to_b64(INIT)},
    "inpaint": {"init_image": image_to_b64(INIT), "mask_image": image_to_b64(half_mask())},
}


@pytest.fixture(scope="module", params=["flagged", "passed"])
def checked(request, server_factory, tmp_path_factory):
    """A server with a tiny checker written by `make-tiny`: one flags every image, one none."""
    threshold = ALWAYS_FLAGS if request.param == "flagged" else NEVER_FLAGS
    folder = tmp_path_factory.mktemp(f"checker-{request.param}")
    cli.main(["make-tiny", "--variant", "safety-checker", "--concept-threshold", str(threshold), str(folder)])
    with server_factory(safety_checker=folder, warmup=False) as live:
        yield request.param == "flagged", live


def assert_verdict(flagged: bool, removed: bool, score: float | None, image: Image.Image) -> None:
    assert removed is flagged
    assert isinstance(score, float)
    assert (score > 0) is flagged  # the highest concept score: above 0 means flagged
    is_black = not np.asarray(image.convert("RGB")).any()
    assert is_black is flagged


@pytest.mark.parametrize("mode", MODES)
def test_octoai_sync_every_mode(checked, mode):
    flagged, live = checked
    response = live.client().image_gen.generate_flux_dev(prompt="a fox", **SMALL, **MODES[mode])
    for item in response.images:
        assert_verdict(flagged, item.removed_for_safety, item.safety_score, b64_to_image(item.image_b64))


def test_octoai_async(checked):
    flagged, live = checked
    sdk = live.client()
    future = sdk.infer_async(
        f"{live.url}/generate/flux-dev", {"prompt": "a fox", **SMALL, **MODES["inpaint"]}
    )
    wait_until(lambda: sdk.is_future_ready(future), what="the async job")
    (item,) = sdk.get_future_result(future)["images"]
    assert_verdict(flagged, item["removed_for_safety"], item["safety_score"], b64_to_image(item["image_b64"]))


def test_openai_generate_and_edit(checked):
    flagged, live = checked
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=120)
    extensions = {"steps": 1, "seed": 3}
    generated = client.images.generate(prompt="a fox", size="512x512", extra_body=extensions)
    buffer = io.BytesIO()
    INIT.save(buffer, format="PNG")
    edited = client.images.edit(
        image=("init.png", buffer.getvalue(), "image/png"),
        prompt="a fox",
        size="512x512",
        extra_body=extensions,
    )
    for item in (*generated.data, *edited.data):
        assert_verdict(flagged, item.removed_for_safety, item.safety_score, b64_to_image(item.b64_json))
