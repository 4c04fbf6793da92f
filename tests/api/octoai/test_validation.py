"""The validation table: every bad request is a 4xx naming the field, never a 5xx."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import b64_to_image, gradient_image, image_to_b64
from helpers.requests import STEPS
from octoai.image_gen.errors.unprocessable_entity_error import UnprocessableEntityError
from PIL import Image

from octoflux.api.octoai.protocol import SUPPORTED_RESOLUTIONS, UNSUPPORTED_ON_FLUX

OK = {"prompt": "a red fox", "width": 512, "height": 512, "steps": 1, "seed": 1}
SMALL_PNG = image_to_b64(gradient_image(64, 64))


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        yield client


def post(http: httpx.Client, body) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return http.post("/generate/flux-dev", json=body)
    return http.post("/generate/flux-dev", content=body, headers={"content-type": "application/json"})


def assert_422_naming(response: httpx.Response, field: str | None) -> list[dict]:
    """A 422 in FastAPI's shape whose errors all point at `field` (the body itself when None)."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    for error in detail:
        assert isinstance(error["loc"], list) and error["loc"][0] == "body"
        assert isinstance(error["msg"], str) and error["msg"]
        assert isinstance(error["type"], str) and error["type"]
        if field is not None:
            assert len(error["loc"]) >= 2 and error["loc"][1] == field, error
    return detail


def with_fields(**fields) -> dict:
    return {**OK, **fields}


# --- out-of-range and wrongly typed values --------------------------------------------------------

OUT_OF_RANGE = [
    ("prompt", ""),
    ("prompt", "x" * 10_001),
    ("prompt", 123),
    ("prompt", ["a", "b"]),
    ("cfg_scale", 0),
    ("cfg_scale", -1.5),
    ("cfg_scale", 51),
    ("cfg_scale", 50.0001),
    ("num_images", 0),
    ("num_images", 17),
    ("num_images", 2.5),
    ("seed", 0),
    ("seed", -3),
    ("seed", 2**32),
    ("seed", 1.5),
    ("seed", True),
    ("steps", 0),
    ("steps", 201),
    ("steps", 2.5),
    ("strength", 0),
    ("strength", 1.5),
    ("strength", -0.2),
    ("width", 1000),
    ("image_encoding", "webp"),
    ("log_prompt", "yes"),
    ("loras", ["not", "a", "map"]),
    ("init_image", 12),
]


@pytest.mark.parametrize(
    ("field", "value"), OUT_OF_RANGE, ids=[f"{f}={str(v)[:12]}" for f, v in OUT_OF_RANGE]
)
def test_out_of_range_value_is_422_naming_the_field(http, field, value):
    assert_422_naming(post(http, with_fields(**{field: value})), field)


@pytest.mark.parametrize(
    "seeds",
    [[1, 0], [1, 2**32], [1, "2"], [1, 2.5], [-1, None]],
    ids=["zero", "2^32", "string", "float", "negative"],
)
def test_seed_list_with_a_bad_entry_is_422(http, seeds):
    assert_422_naming(post(http, with_fields(num_images=2, seed=seeds)), "seed")


@pytest.mark.parametrize(("num_images", "seeds"), [(2, [1]), (2, [1, 2, 3]), (1, [])])
def test_seed_list_length_must_equal_num_images(http, num_images, seeds):
    (error,) = assert_422_naming(post(http, with_fields(num_images=num_images, seed=seeds)), "seed")
    assert "num_images" in error["msg"]


def test_the_top_seed_wraps_to_1_for_the_next_image_as_the_readme_says(http):
    response = post(http, {**OK, "seed": 2**32 - 1, "num_images": 2})
    assert [image["seed"] for image in response.json()["images"]] == [2**32 - 1, 1]
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    (seed_row,) = [line for line in readme.splitlines() if line.startswith("| `seed` |")]
    assert "wrapping past 4294967295 to 1" in seed_row


def test_seed_list_length_defaults_num_images_to_one(http):
    assert_422_naming(post(http, {**OK, "seed": [1, 2]}), "seed")


@pytest.mark.parametrize(
    ("field", "value"),
    [("cfg_scale", "NaN"), ("cfg_scale", "Infinity"), ("strength", "-Infinity"), ("steps", "NaN")],
)
def test_nan_and_infinity_are_422(http, field, value):
    raw = json.dumps(OK)[:-1] + f', "{field}": {value}}}'
    assert_422_naming(post(http, raw.encode()), field)


def test_nan_lora_weight_is_422(http):
    raw = json.dumps(OK)[:-1] + ', "loras": {"style": NaN}}'
    assert_422_naming(post(http, raw.encode()), "loras")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", "2"),
        ("cfg_scale", "3.5"),
        ("num_images", "2"),
        ("seed", "5"),
        ("width", "512"),
        ("height", "512"),
        ("strength", "0.5"),
        ("steps", True),
    ],
)
def test_numbers_as_strings_or_bools_are_422(http, field, value):
    assert_422_naming(post(http, with_fields(**{field: value})), field)


# --- resolutions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "field"),
    [
        (1000, 1000, "width"),
        (512, 1024, "height"),
        (1024, 512, "height"),
        (640, 640, "height"),
        (0, 0, "width"),
    ],
)
def test_unsupported_resolution_is_422_listing_supported_ones(http, width, height, field):
    (error,) = assert_422_naming(post(http, with_fields(width=width, height=height)), field)
    for w, h in SUPPORTED_RESOLUTIONS:
        assert f"{w}x{h}" in error["msg"]


def test_width_alone_without_init_image_must_make_a_supported_size(http):
    # 512 x default 1024 is not a FLUX.1-dev resolution.
    body = {k: v for k, v in OK.items() if k != "height"}
    assert_422_naming(post(http, body), "height")


def test_size_that_cannot_match_init_image_is_422(http):
    body = {k: v for k, v in OK.items() if k != "height"}
    body.update(width=1000, init_image=SMALL_PNG)
    assert_422_naming(post(http, body), "width")


@pytest.mark.parametrize(("width", "height"), SUPPORTED_RESOLUTIONS)
def test_every_supported_resolution_is_accepted_by_validation(http, width, height):
    # steps=0 fails validation after the size checks; a size error would name width/height.
    response = post(http, with_fields(width=width, height=height, steps=0))
    assert_422_naming(response, "steps")


# --- FLUX-unsupported fields ----------------------------------------------------------------------

PLAUSIBLE = {
    "checkpoint": "octoai:crystal-clear",
    "clip_skip": 2,
    "controlnet": "octoai:canny_sdxl",
    "controlnet_conditioning_scale": 0.5,
    "controlnet_early_stop": 0.5,
    "controlnet_image": SMALL_PNG,
    "controlnet_preprocess": True,
    "high_noise_frac": 0.8,
    "inpaint_full_res": False,
    "inpaint_full_res_padding": 32,
    "negative_prompt": "blurry",
    "negative_prompt_2": "blurry",
    "outpainting": False,
    "prompt_2": "a fox",
    "sampler": "DDIM",
    "style_preset": "base",
    "textual_inversions": {"ti": "<ti>"},
    "transfer_images": {"word": [SMALL_PNG]},
    "use_refiner": False,
    "vae": "octoai:vae",
}


def test_plausible_values_cover_every_unsupported_field():
    assert set(PLAUSIBLE) == set(UNSUPPORTED_ON_FLUX)


@pytest.mark.parametrize("field", UNSUPPORTED_ON_FLUX)
def test_unsupported_on_flux_field_with_a_value_is_422_naming_it(http, field):
    (error,) = assert_422_naming(post(http, with_fields(**{field: PLAUSIBLE[field]})), field)
    assert "FLUX" in error["msg"]


def test_unsupported_on_flux_fields_set_to_null_are_accepted(http):
    response = post(http, with_fields(**dict.fromkeys(UNSUPPORTED_ON_FLUX)))
    assert response.status_code == 200, response.text
    assert b64_to_image(response.json()["images"][0]["image_b64"]).size == (512, 512)


def test_all_optional_fields_null_are_accepted(http):
    body = {
        "prompt": "a red fox",
        **dict.fromkeys(["cfg_scale", "num_images", "seed", "strength", "init_image", "mask_image"]),
        **dict.fromkeys(["loras", "image_encoding", "log_prompt"]),
        "width": 512,
        "height": 512,
        "steps": 1,
    }
    assert post(http, body).status_code == 200


def test_boundary_values_are_accepted(http):
    response = post(
        http,
        {
            "prompt": "x" * 10_000,
            "cfg_scale": 50,
            "seed": 2**32 - 1,
            "steps": 1,
            "width": 512,
            "height": 512,
            "init_image": SMALL_PNG,
            "strength": 1,
            "log_prompt": True,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["seed"] == 2**32 - 1


@pytest.mark.parametrize(("field", "value"), [("foo", 1), ("Prompt", "x"), ("guidance_scale", 3.5)])
def test_unknown_field_is_422_naming_it(http, field, value):
    assert_422_naming(post(http, with_fields(**{field: value})), field)


def test_sdk_raises_unprocessable_entity_for_unsupported_field(sdk):
    with pytest.raises(UnprocessableEntityError) as caught:
        sdk.image_gen.generate_flux_dev(prompt="a fox", negative_prompt2="blurry", width=512, height=512)
    (error,) = caught.value.body.detail
    assert list(error.loc) == ["body", "negative_prompt_2"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(prompt=""), "prompt"),
        (dict(cfg_scale=51), "cfg_scale"),
        (dict(num_images=17), "num_images"),
        (dict(steps=201), "steps"),
        (dict(strength=1.5), "strength"),
        (dict(width=1000, height=1000), "width"),
        (dict(num_images=2, seed=[1]), "seed"),
        (dict(sampler="DDIM"), "sampler"),
        (dict(mask_image=SMALL_PNG), "mask_image"),
        (dict(init_image="not an image"), "init_image"),
    ],
)
def test_sdk_raises_unprocessable_entity_naming_the_field(sdk, fields, field):
    with pytest.raises(UnprocessableEntityError) as caught:
        sdk.image_gen.generate_flux_dev(**{**dict(prompt="a fox", steps=STEPS), **fields})
    assert caught.value.status_code == 422
    assert caught.value.body.detail
    assert all(err.loc[:2] == ["body", field] for err in caught.value.body.detail)


# --- images ---------------------------------------------------------------------------------------


def test_mask_image_without_init_image_is_422(http):
    (error,) = assert_422_naming(post(http, with_fields(mask_image=SMALL_PNG)), "mask_image")
    assert "init_image" in error["msg"]


def test_mask_with_another_aspect_than_init_is_422(http):
    body = with_fields(init_image=SMALL_PNG, mask_image=image_to_b64(Image.new("L", (64, 128), 255)))
    assert_422_naming(post(http, body), "mask_image")


def gif_b64() -> str:
    return image_to_b64(gradient_image(32, 32).convert("P"), "GIF")


def truncated_png_b64() -> str:
    data = base64.b64decode(image_to_b64(gradient_image(64, 64)))
    return base64.b64encode(data[: len(data) // 2]).decode()


UNDECODABLE = {
    "not-base64": "this is not base64 !!!",
    "base64-of-text": base64.b64encode(b"hello, world").decode(),
    "empty": "",
    "gif": gif_b64(),
    "truncated-png": truncated_png_b64(),
    "data-url-of-text": "data:image/png;base64," + base64.b64encode(b"hello").decode(),
}


@pytest.mark.parametrize("field", ["init_image", "mask_image"])
@pytest.mark.parametrize("kind", list(UNDECODABLE))
def test_undecodable_image_is_422_naming_the_field(http, field, kind):
    body = with_fields(init_image=SMALL_PNG) | {field: UNDECODABLE[kind]}
    assert_422_naming(post(http, body), field)


# --- JSON that is not a request object ------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"[]", b'"a fox"', b"42", b"null", b'[{"prompt": "a fox"}]'])
def test_json_that_is_not_an_object_is_422(http, raw):
    assert_422_naming(post(http, raw), None)


@pytest.mark.parametrize("raw", [b"{", b"{'prompt': 'a fox'}", b"prompt=a+fox", b"\xff\xfe"])
def test_malformed_json_is_422(http, raw):
    assert_422_naming(post(http, raw), None)


def test_missing_prompt_is_422(http):
    assert_422_naming(post(http, {"steps": 1}), "prompt")


def test_response_of_valid_request_after_errors_is_still_fine(http):
    """Bad requests leave the server healthy."""
    response = post(http, OK)
    assert response.status_code == 200
    assert b64_to_image(response.json()["images"][0]["image_b64"]).size == (512, 512)


def test_data_url_prefix_with_other_media_type_still_decodes(http):
    data = "data:image/webp;base64," + image_to_b64(gradient_image(64, 64), "WEBP")
    assert post(http, with_fields(init_image=data)).status_code == 200


def test_error_does_not_echo_the_image(http):
    response = post(http, with_fields(init_image=UNDECODABLE["truncated-png"], cfg_scale=99))
    assert response.status_code == 422
    assert UNDECODABLE["truncated-png"][:40] not in response.text
    assert len(response.content) < 4096


# --- size limits: a server with tight limits ------------------------------------------------------


@pytest.fixture(scope="module")
def tight(server_factory):
    # create_app sets Pillow's process-wide decompression-bomb limit, which the shared live
    # server (same process) then also sees: these tests come last and put it back.
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with (
            server_factory(max_image_mb=0.05, max_image_pixels=300 * 300, max_body_mb=0.25) as live,
            httpx.Client(base_url=live.url, timeout=60) as client,
        ):
            yield client
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def noise_png_b64(width: int, height: int) -> str:
    rng = np.random.default_rng(0)
    return image_to_b64(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))


@pytest.mark.parametrize("field", ["init_image", "mask_image"])
def test_image_over_byte_limit_is_422(tight, field):
    big = noise_png_b64(200, 200)  # ~120 kB of base64 for 40k pixels: over bytes, under pixels
    assert 0.05 * 2**20 < len(big) < 0.25 * 2**20
    body = with_fields(init_image=SMALL_PNG, mask_image=SMALL_PNG) | {field: big}
    (error,) = assert_422_naming(post(tight, body), field)
    assert "MB" in error["msg"]


@pytest.mark.parametrize("field", ["init_image", "mask_image"])
def test_image_over_pixel_limit_is_422(tight, field):
    big = image_to_b64(Image.new("RGB", (400, 400), (10, 20, 30)))  # few bytes, 160k pixels
    body = with_fields(init_image=SMALL_PNG, mask_image=SMALL_PNG) | {field: big}
    (error,) = assert_422_naming(post(tight, body), field)
    assert "pixel" in error["msg"]


def test_image_far_over_pixel_limit_is_422(tight):
    # More than twice the limit: Pillow refuses it as a decompression bomb while opening.
    big = image_to_b64(Image.new("L", (1000, 1000), 0))
    (error,) = assert_422_naming(post(tight, with_fields(init_image=big)), "init_image")
    assert "pixel" in error["msg"]


def test_images_within_limits_are_accepted(tight):
    assert post(tight, with_fields(init_image=SMALL_PNG, mask_image=SMALL_PNG)).status_code == 200


def test_body_over_max_body_mb_is_413(tight):
    body = json.dumps(with_fields(init_image="A" * int(0.3 * 2**20))).encode()
    response = post(tight, body)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


def test_streamed_body_over_max_body_mb_is_413(tight):
    """Without Content-Length (chunked upload) the limit is enforced while reading."""
    body = json.dumps(with_fields(init_image="A" * int(0.3 * 2**20))).encode()

    def chunks():
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = tight.post(
        "/generate/flux-dev", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413, response.text


def test_body_under_max_body_mb_is_not_413(tight):
    response = post(tight, json.dumps(with_fields(prompt="x" * 10_000)).encode())
    assert response.status_code == 200


def test_no_bad_request_gives_5xx_on_the_tight_server(tight):
    bodies = [
        with_fields(init_image=noise_png_b64(600, 600)),
        with_fields(init_image=image_to_b64(Image.new("RGB", (300, 300)), "JPEG")),
        with_fields(init_image=UNDECODABLE["truncated-png"]),
        b"{" + b"0" * 1000,
    ]
    for body in bodies:
        assert post(tight, body).status_code < 500
