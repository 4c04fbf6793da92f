"""The OpenAI Images API through the official `openai` client pointed at BASE/v1, on the tiny FLUX."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import b64_to_image, gradient_image, image_to_b64, pixels
from helpers.engine_control import WAIT, wait_until
from helpers.requests import STEPS
from PIL import Image

from octoflux.api.openai.uploads import read_mask
from octoflux.core.spec import ImageLimits

KEY = "test-key"
SIZE = "512x512"
FAST = {"steps": STEPS}  # the `steps` extension keeps the tiny model quick


@pytest.fixture(scope="module")
def server(server_factory):
    with server_factory(api_keys=KEY, warmup=False) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def left_half_transparent(width: int, height: int) -> Image.Image:
    """OpenAI's polarity: transparent (edit) on the left half, opaque (keep) on the right."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


def decoded(item) -> Image.Image:
    return b64_to_image(item.b64_json)


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["type"] == "invalid_request_error"
    return error


# --- models ------------------------------------------------------------------------------------


def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("flux-dev", "model", "octoflux")]
    assert models.data[0].created > 0


def test_models_retrieve_gives_the_served_model_and_404_for_others(client):
    model = client.models.retrieve("flux-dev")
    assert (model.id, model.object, model.owned_by) == ("flux-dev", "model", "octoflux")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.body["code"] == "model_not_found" and "dall-e-3" in caught.value.body["message"]


def test_unknown_path_and_wrong_method_answer_in_openai_shape(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    unknown = httpx.post(f"{server.url}/v1/images/variations", headers=headers)
    wrong_method = httpx.get(f"{server.url}/v1/images/generations", headers=headers)
    assert (unknown.status_code, wrong_method.status_code) == (404, 405)
    assert wrong_method.headers["allow"] == "POST"
    for response in (unknown, wrong_method):
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_url", error
    assert unknown.json()["error"]["message"] == "Invalid URL (POST /v1/images/variations)"
    # The OctoAI routes keep FastAPI's shape, which the octoai SDK parses.
    assert httpx.get(f"{server.url}/generate/flux-dev").json() == {"detail": "Method Not Allowed"}


# --- generations -------------------------------------------------------------------------------


def test_generate_b64_gives_n_pngs_with_consecutive_seeds_and_no_safety_verdict(client):
    response = client.images.generate(prompt="a red fox", n=2, size=SIZE, extra_body={**FAST, "seed": 7})
    assert response.created > 0 and response.size == SIZE and response.output_format == "png"
    assert [item.seed for item in response.data] == [7, 8]
    for item in response.data:
        image = decoded(item)
        assert (image.format, image.size) == ("PNG", (512, 512))
        assert item.url is None
        # Without --safety-checker: nothing removed, no score.
        assert (item.removed_for_safety, item.safety_score) == (False, None)


def test_openai_calls_are_counted_under_their_own_api_label(server, client):
    def count(api: str) -> float:
        text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        prefix = f'octoflux_request_seconds_count{{api="{api}",mode="text2img"}} '
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(prefix))

    before = count("openai"), count("sync")
    client.images.generate(prompt="a counted fox", size=SIZE, extra_body=FAST)
    assert (count("openai"), count("sync")) == (before[0] + 1, before[1])


def test_generate_gives_the_octoai_routes_pixels_for_the_same_seed(server, client):
    response = client.images.generate(prompt="a red fox", size=SIZE, extra_body={**FAST, "seed": 11})
    octoai = server.client(KEY).image_gen.generate_flux_dev(
        prompt="a red fox", width=512, height=512, steps=STEPS, seed=11
    )
    assert np.array_equal(pixels(decoded(response.data[0])), pixels(b64_to_image(octoai.images[0].image_b64)))


def test_generate_auto_size_is_1024x1024(client):
    response = client.images.generate(prompt="a fox", size="auto", extra_body={"steps": 1})
    assert response.size == "1024x1024"
    assert decoded(response.data[0]).size == (1024, 1024)


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_generate_output_format(client, output_format, pil_format):
    response = client.images.generate(prompt="a fox", size=SIZE, output_format=output_format, extra_body=FAST)
    assert response.output_format == output_format
    assert decoded(response.data[0]).format == pil_format


def test_fields_with_no_flux_meaning_are_accepted_and_ignored(client):
    response = client.images.generate(
        prompt="a fox",
        size=SIZE,
        quality="high",
        style="vivid",
        user="someone",
        background="auto",
        moderation="low",
        output_compression=80,
        extra_body=FAST,
    )
    assert len(response.data) == 1


def test_url_result_is_fetched_without_the_key_and_equals_the_b64_result(server, client):
    request = dict(prompt="a fox", size=SIZE, extra_body={**FAST, "seed": 21})
    linked = client.images.generate(response_format="url", **request)
    inline = client.images.generate(response_format="b64_json", **request)
    url = linked.data[0].url
    assert url.startswith(f"{server.url}/v1/images/results/") and linked.data[0].b64_json is None
    fetched = httpx.get(url)  # no Authorization header
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(inline.data[0].b64_json)


def test_wrong_or_expired_link_is_404(server, client):
    wrong = httpx.get(f"{server.url}/v1/images/results/not-a-real-token")
    assert wrong.status_code == 404 and wrong.json()["error"]["type"] == "invalid_request_error"
    url = (
        client.images.generate(prompt="a fox", size=SIZE, response_format="url", extra_body=FAST).data[0].url
    )
    assert httpx.get(url).status_code == 200
    later = time.time() + server.settings.result_ttl + 1
    server.service.async_jobs.store.sweep(server.settings.result_ttl, now=later)
    assert httpx.get(url).status_code == 404


# --- edits -------------------------------------------------------------------------------------


def test_edit_with_mask_repaints_transparent_pixels_and_keeps_opaque_ones(client):
    init = gradient_image(512, 512)
    response = client.images.edit(
        image=("init.png", png_bytes(init), "image/png"),
        mask=("mask.png", png_bytes(left_half_transparent(512, 512)), "image/png"),
        prompt="a blue sky",
        size=SIZE,
        extra_body={**FAST, "seed": 3},
    )
    got, want = pixels(decoded(response.data[0])), pixels(init)
    kept, edited = slice(256, 512), slice(0, 256 - 8)  # skip the feathered edge
    assert np.array_equal(got[:, kept], want[:, kept])
    assert np.any(got[:, edited] != want[:, edited], axis=-1).mean() > 0.9


def test_edit_without_mask_is_image_to_image_as_on_the_octoai_route(server, client):
    init = gradient_image(512, 512)
    response = client.images.edit(
        image=[("init.png", png_bytes(init), "image/png")],  # sent as image[]
        prompt="an oil painting",
        size=SIZE,
        extra_body={**FAST, "seed": 4},
    )
    octoai = server.client(KEY).image_gen.generate_flux_dev(
        prompt="an oil painting", init_image=image_to_b64(init), width=512, height=512, steps=STEPS, seed=4
    )
    assert np.array_equal(pixels(decoded(response.data[0])), pixels(b64_to_image(octoai.images[0].image_b64)))


def test_mask_polarity_transparent_is_white_repaint():
    mask = left_half_transparent(8, 4)
    engine_mask = np.asarray(read_mask(png_bytes(mask), ImageLimits(2**20, 10**6), (8, 4)))
    assert (engine_mask[:, :4] == 255).all() and (engine_mask[:, 4:] == 0).all()


# --- errors ------------------------------------------------------------------------------------


def test_unsupported_size_is_400_listing_the_supported_sizes(client):
    error = bad_request(lambda: client.images.generate(prompt="a fox", size="1536x1024"))
    assert error["param"] == "size"
    assert "512x512" in error["message"] and "1536x640" in error["message"]


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range_is_400(client, n):
    assert bad_request(lambda: client.images.generate(prompt="a fox", n=n))["param"] == "n"


def test_unknown_model_is_400_listing_the_served_model(client):
    error = bad_request(lambda: client.images.generate(prompt="a fox", model="dall-e-3"))
    assert error["param"] == "model" and "flux-dev" in error["message"]


def test_served_model_id_is_accepted(client):
    response = client.images.generate(prompt="a fox", model="flux-dev", size=SIZE, extra_body=FAST)
    assert len(response.data) == 1


def test_stream_false_is_accepted_on_both_routes_and_true_is_400(server, client):
    assert len(client.images.generate(prompt="a fox", size=SIZE, stream=False, extra_body=FAST).data) == 1
    init = ("init.png", png_bytes(gradient_image(512, 512)), "image/png")
    edited = client.images.edit(image=init, prompt="a fox", size=SIZE, stream=False, extra_body=FAST)
    assert len(edited.data) == 1  # multipart sends the string "false"
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/images"
    for response in (
        httpx.post(f"{url}/generations", json={"prompt": "a fox", "stream": True}, headers=headers),
        httpx.post(
            f"{url}/edits", data={"prompt": "a fox", "stream": "true"}, files={"image": init}, headers=headers
        ),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "stream" and "streaming is not offered" in error["message"]


def test_unknown_argument_and_bad_extension_are_400(client):
    assert bad_request(lambda: client.images.generate(prompt="a fox", extra_body={"negative": 1}))[
        "param"
    ] == ("negative")
    assert (
        bad_request(lambda: client.images.generate(prompt="a fox", extra_body={"steps": 0}))["param"]
        == "steps"
    )


def test_undecodable_image_is_400_naming_image(client):
    error = bad_request(
        lambda: client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="a fox", size=SIZE)
    )
    assert error["param"] == "image"


def test_mask_of_another_size_is_400_naming_mask(client):
    error = bad_request(
        lambda: client.images.edit(
            image=("init.png", png_bytes(gradient_image(512, 512)), "image/png"),
            mask=("mask.png", png_bytes(left_half_transparent(256, 256)), "image/png"),
            prompt="a fox",
        )
    )
    assert error["param"] == "mask" and "256x256" in error["message"] and "512x512" in error["message"]


def test_mask_without_alpha_is_400_naming_mask(client):
    error = bad_request(
        lambda: client.images.edit(
            image=("init.png", png_bytes(gradient_image(64, 64)), "image/png"),
            mask=("mask.png", png_bytes(Image.new("RGB", (64, 64))), "image/png"),
            prompt="a fox",
        )
    )
    assert error["param"] == "mask" and "alpha" in error["message"]


def test_bad_input_over_raw_http_is_openai_400_never_fastapi_422(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/images"
    for response in (
        httpx.post(f"{url}/generations", json={"size": SIZE}, headers=headers),  # no prompt
        httpx.post(f"{url}/generations", content=b"{not json", headers=headers),
        httpx.post(f"{url}/generations", json=["a list"], headers=headers),
        httpx.post(f"{url}/edits", data={"prompt": "a fox"}, headers=headers),  # no image
        httpx.post(f"{url}/edits", json={"prompt": "a fox"}, headers=headers),  # not multipart
    ):
        assert response.status_code == 400, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{url}/generations", json={"size": SIZE}, headers=headers).json()["error"]
    assert missing["param"] == "prompt" and missing["code"] == "missing_required_parameter"
    json_to_edits = httpx.post(f"{url}/edits", json={"prompt": "a fox"}, headers=headers).json()["error"]
    assert (
        json_to_edits["code"] == "invalid_content_type" and "multipart/form-data" in json_to_edits["message"]
    )
    text_for_file = httpx.post(f"{url}/edits", data={"prompt": "a fox", "image": "fox.png"}, headers=headers)
    error = text_for_file.json()["error"]
    assert error["param"] == "image" and "expected a file upload" in error["message"], error


def test_bad_key_is_authentication_error(server):
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.images.generate(prompt="a fox")
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


# --- a full queue ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_server(server_factory, control):
    with server_factory(engine_factory=control.factory, warmup=False, max_queue=1) as live:
        yield live
    control.release_all()


def test_queue_full_is_rate_limit_error_with_retry_after(full_server, control):
    client = openai.OpenAI(base_url=f"{full_server.url}/v1", api_key="none", max_retries=0, timeout=WAIT)
    gate = control.hold("running")
    threads = [
        threading.Thread(
            target=client.images.generate, kwargs=dict(prompt=prompt, size=SIZE, extra_body=FAST)
        )
        for prompt in ("running", "queued")
    ]
    threads[0].start()
    assert control.reached["running"].wait(WAIT)
    threads[1].start()
    wait_until(lambda: full_server.service.jobs.depth == 1, what="a queued job")
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(prompt="rejected", size=SIZE, extra_body=FAST)
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert caught.value.body["code"] == "rate_limit_exceeded"
    finally:
        gate.set()
        for thread in threads:
            thread.join(WAIT)


# --- pure parts ---------------------------------------------------------------------------------


def test_result_links_live_in_the_state_store_and_expire_with_the_ttl(tmp_path):
    import asyncio

    from octoflux.core.errors import NotFound
    from octoflux.core.links import ResultLinks
    from octoflux.state.store import open_state_store

    url = f"sqlite:///{tmp_path}/state.db"
    # A TTL long enough that the reads right after storing come before it on a slow machine.
    links = ResultLinks(open_state_store(url), ttl_s=1.0)
    (token,) = asyncio.run(links.publish([b"\x89PNG fake"], "image/png"))
    other_replica = ResultLinks(open_state_store(url), ttl_s=1.0)
    assert asyncio.run(other_replica.image(token)) == (b"\x89PNG fake", "image/png")
    assert links.store.get_job(token) is None  # a link is not a job: no poll URL reaches it
    with pytest.raises(NotFound):
        asyncio.run(links.image("nope"))
    time.sleep(1.1)
    with pytest.raises(NotFound):
        asyncio.run(links.image(token))
