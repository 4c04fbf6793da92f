"""Hostile and malformed input: each gets a 4xx that names the problem, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from conftest import gradient_image, image_to_b64
from helpers.requests import STEPS, URL_PATH

from octoflux.core.codec import ImageDecodeError, decode_image

MAX_IMAGE_MB = 1
MAX_BODY_MB = 2
LIMITS = dict(max_bytes=MAX_IMAGE_MB * 2**20, max_pixels=40_000_000)


@pytest.fixture(scope="module")
def server(server_factory):
    with server_factory(warmup=False, max_image_mb=MAX_IMAGE_MB, max_body_mb=MAX_BODY_MB) as live:
        yield live


@pytest.fixture(autouse=True)
def still_serving(request):
    yield
    if "server" in request.fixturenames:
        live = request.getfixturevalue("server")
        assert httpx.get(f"{live.url}/readyz", timeout=5).status_code == 200


def post(server, payload=None, **kwargs) -> httpx.Response:
    if payload is not None:
        kwargs["json"] = payload
    return httpx.post(f"{server.url}{URL_PATH}", timeout=60, **kwargs)


def post_raw(server, raw: bytes) -> httpx.Response:
    return post(server, content=raw, headers={"content-type": "application/json"})


def img2img(image_b64: str, **extra) -> dict:
    return {"prompt": "x", "init_image": image_b64, "width": 512, "height": 512, "steps": STEPS, **extra}


def assert_422(response: httpx.Response, field: str, *words: str) -> None:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    matching = [e for e in errors if e["loc"][-1] == field or field in e["loc"]]
    assert matching, errors
    for word in words:
        assert any(word in e["msg"] for e in matching), (word, errors)


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + chunk(b"IEND", b"")
    )


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png_bytes(image) -> bytes:
    return base64.b64decode(image_to_b64(image))


# Images over HTTP.


@pytest.mark.parametrize("size", [(50_000, 50_000), (7_000, 7_000)])
def test_decompression_bomb_is_rejected_before_decoding(server, size):
    assert_422(post(server, img2img(b64(png_claiming(*size)))), "init_image", "pixel limit")


def test_truncated_image_is_rejected(server):
    raw = png_bytes(gradient_image(64, 64))
    assert_422(post(server, img2img(b64(raw[: len(raw) // 2]))), "init_image", "truncated")


def test_corrupt_image_data_is_rejected(server):
    raw = bytearray(png_bytes(gradient_image(64, 64)))
    raw[60:80] = b"\xff" * 20
    assert_422(post(server, img2img(b64(bytes(raw)))), "init_image", "corrupt")


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"hello, I am not an image", ("not a PNG, JPEG or WebP",)),
        (b"%PDF-1.4\n" + b"0" * 100, ("not a PNG, JPEG or WebP",)),
        (b"GIF89a" + b"\x00" * 64, ("not a PNG, JPEG or WebP",)),
    ],
)
def test_non_image_bytes_are_rejected(server, raw, words):
    assert_422(post(server, img2img(b64(raw))), "init_image", *words)


def test_gif_is_not_an_accepted_format(server):
    buffer = io.BytesIO()
    gradient_image(32, 32).save(buffer, format="GIF")
    assert_422(post(server, img2img(b64(buffer.getvalue()))), "init_image", "not a PNG, JPEG or WebP")


@pytest.mark.parametrize(
    "value", ["not base64 at all!", "QUJD$", "====", "-_-_", "data:image/png;base64,@@@"]
)
def test_bad_base64_is_rejected(server, value):
    assert_422(post(server, img2img(value)), "init_image", "base64")


def test_empty_image_is_rejected(server):
    assert_422(post(server, img2img("")), "init_image", "empty")


def test_data_urls_must_be_base64_images(server):
    png = image_to_b64(gradient_image(64, 64))
    assert_422(post(server, img2img(f"data:image/png,{png}")), "init_image", "base64")
    assert_422(post(server, img2img(f"data:text/plain;base64,{png}")), "init_image", "media type")


def test_data_url_cmyk_jpeg_with_exif_rotation_is_accepted(server):
    cmyk = cmyk_jpeg_with_rotation()
    response = post(server, img2img(f"data:image/jpeg;base64,{cmyk}"))
    assert response.status_code == 200, response.text


def test_image_over_the_size_limit_is_rejected(server):
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    from PIL import Image

    raw = png_bytes(Image.fromarray(noise))
    assert len(raw) > MAX_IMAGE_MB * 2**20
    assert_422(post(server, img2img(b64(raw))), "init_image", "MB limit")


def test_mask_and_image_of_different_shapes_are_rejected(server):
    payload = img2img(
        image_to_b64(gradient_image(64, 64)), mask_image=image_to_b64(gradient_image(64, 32).convert("L"))
    )
    assert_422(post(server, payload), "mask_image", "aspect")


def test_mask_without_image_is_rejected(server):
    payload = {"prompt": "x", "mask_image": image_to_b64(gradient_image(8, 8))}
    assert_422(post(server, payload), "mask_image", "init_image")


# Prompts.


def test_ten_thousand_non_ascii_characters_are_a_valid_prompt(server):
    prompt = ("猫 🐱 قطة émigré ​ \x00 ñ " * 500)[:10_000]
    assert len(prompt) == 10_000
    response = post(server, {"prompt": prompt, "width": 512, "height": 512, "steps": 1})
    assert response.status_code == 200, response.text


def test_prompt_over_ten_thousand_characters_is_rejected(server):
    assert_422(post(server, {"prompt": "a" * 10_001}), "prompt", "10000")


def test_lone_surrogate_in_prompt_is_rejected(server):
    assert_422(post_raw(server, b'{"prompt": "\\ud800 cat"}'), "prompt", "unicode")


# Bodies.


def test_body_over_the_limit_is_413(server):
    response = post(server, {"prompt": "x", "init_image": "A" * (MAX_BODY_MB * 2**20 + 10)})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def chunked_over_the_limit(head: bytes, tail: bytes) -> Iterator[bytes]:
    """A body twice the limit, sent in chunks with no Content-Length."""
    yield head
    for _ in range(MAX_BODY_MB * 4):
        yield b"A" * 2**19
    yield tail


def test_chunked_body_over_the_limit_is_413(server):
    chunks = chunked_over_the_limit(b'{"prompt": "x", "init_image": "', b'"}')
    response = post(server, content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413


def openai_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "body_too_large" and error["type"] == "invalid_request_error"
    assert f"{MAX_BODY_MB:g} MB limit" in error["message"]


def test_openai_route_gets_its_413_in_openai_shape(server):
    payload = {"prompt": "x" * (MAX_BODY_MB * 2**20 + 10)}
    openai_too_large(httpx.post(f"{server.url}/v1/images/generations", json=payload, timeout=60))


def test_openai_chunked_upload_over_the_limit_gets_openai_413(server):
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    chunks = chunked_over_the_limit(part, b"\r\n--b--\r\n")
    headers = {"content-type": "multipart/form-data; boundary=b"}
    openai_too_large(httpx.post(f"{server.url}/v1/images/edits", content=chunks, headers=headers, timeout=60))


@pytest.mark.parametrize(
    "headers, content",
    [
        ({"content-type": "text/plain"}, b'{"prompt": "x"}'),
        ({}, b'{"prompt": "x"}'),
        ({"content-type": "application/x-www-form-urlencoded"}, b"prompt=x"),
        ({"content-type": "multipart/form-data; boundary=b"}, b"--b\r\n\r\nx\r\n--b--\r\n"),
    ],
)
def test_wrong_content_type_is_415(server, headers, content):
    response = post(server, content=content, headers=headers)
    assert response.status_code == 415 and "application/json" in response.json()["detail"]


@pytest.mark.parametrize("raw", [b"[]", b"null", b'"prompt"', b"42", b"true"])
def test_json_that_is_not_an_object_is_rejected(server, raw):
    response = post_raw(server, raw)
    assert response.status_code == 422
    assert "must be a JSON object" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("raw", [b'{"prompt": ', b"{prompt: 'x'}", b'{"prompt": "x",}', b"\xff\xfe{}"])
def test_malformed_json_is_a_4xx(server, raw):
    assert post_raw(server, raw).status_code in (400, 422)


def test_deeply_nested_json_is_a_4xx(server):
    raw = b'{"prompt": "x", "loras": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert post_raw(server, raw).status_code in (400, 422)


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", "30"),
        ("num_images", "2"),
        ("seed", "5"),
        ("cfg_scale", "3.5"),
        ("width", "512"),
        ("strength", "0.5"),
    ],
)
def test_numbers_as_strings_are_rejected(server, field, value):
    assert_422(post(server, {"prompt": "x", field: value}), field)


@pytest.mark.parametrize(
    "field, literal",
    [("cfg_scale", "NaN"), ("strength", "Infinity"), ("cfg_scale", "-Infinity"), ("cfg_scale", "1e999")],
)
def test_nan_and_infinity_are_rejected(server, field, literal):
    assert_422(post_raw(server, f'{{"prompt": "x", "{field}": {literal}}}'.encode()), field, "finite")


def test_nan_lora_weight_is_rejected(server):
    assert post_raw(server, b'{"prompt": "x", "loras": {"a": NaN}}').status_code == 422


@pytest.mark.parametrize("field", ["seed", "steps", "num_images", "width"])
def test_huge_integers_are_rejected(server, field):
    assert post(server, {"prompt": "x", field: 10**40}).status_code == 422


# Decoding, unit by unit: every mode comes out as upright 8-bit RGB.


def encode(image, fmt: str = "PNG", **save_args) -> str:
    return image_to_b64(image, fmt, **save_args)


def decoded(value: str):
    return decode_image(value, "init_image", **LIMITS)


def cmyk_jpeg_with_rotation() -> str:
    from PIL import Image

    image = Image.new("CMYK", (64, 32), (0, 255, 255, 0))  # red, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    return encode(image, "JPEG", exif=exif)


def test_cmyk_jpeg_becomes_rgb_and_exif_rotation_is_applied():
    image = decoded(cmyk_jpeg_with_rotation())
    assert image.mode == "RGB" and image.size == (32, 64)
    red, green, blue = image.getpixel((16, 32))
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits():
    from PIL import Image

    sixteen = Image.fromarray(np.full((16, 16), 0x8000, dtype=np.uint16))
    image = decoded(encode(sixteen))
    assert image.mode == "RGB" and abs(image.getpixel((0, 0))[0] - 128) <= 1


def test_palette_and_alpha_images_are_composited_on_white():
    from PIL import Image

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    assert decoded(encode(palette, transparency=0)).getpixel((4, 4)) == (255, 255, 255)
    assert decoded(encode(palette, transparency=0)).getpixel((0, 0)) == (255, 0, 0)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decoded(encode(clear)).getpixel((0, 0)) == (255, 255, 255)
    assert decoded(encode(Image.new("LA", (8, 8), (0, 255)))).getpixel((0, 0)) == (0, 0, 0)
    assert decoded(encode(Image.new("1", (8, 8), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_webp_and_line_wrapped_base64_are_accepted():
    raw = base64.b64decode(encode(gradient_image(16, 16), "WEBP"))
    wrapped = "\n".join(textwrap_chunks(b64(raw), 76))
    assert decoded(wrapped).size == (16, 16)


def textwrap_chunks(text: str, width: int) -> list[str]:
    return [text[i : i + width] for i in range(0, len(text), width)]


def test_decode_errors_name_the_field():
    with pytest.raises(ImageDecodeError) as error:
        decode_image("!!", "mask_image", **LIMITS)
    assert error.value.field == "mask_image"
