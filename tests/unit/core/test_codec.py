"""PNG output stays lossless whichever encoder writes it (fpng when importable, else Pillow)."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from octoflux.core.codec import PNG_ENCODER, encode_image, encode_images, png_bytes

ENCODERS = ["pillow", pytest.param("fpng", marks=pytest.mark.skipif(
    importlib.util.find_spec("fpng") is None, reason="fpng is not installed"))]  # fmt: skip


def noisy(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    # A smooth ramp under the noise, so that filters and runs are exercised too.
    array[: height // 2] = (
        np.arange(width, dtype=np.uint16)[None, :, None] * 255 // max(1, width - 1)
    ).astype(np.uint8)
    return Image.fromarray(array, mode)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 9), (513, 257), (1024, 1024)])
def test_png_decodes_back_pixel_identical(encoder, size):
    image = noisy(*size, seed=size[0])
    back = decoded(png_bytes(image, encoder))
    assert back.mode == "RGB" and back.size == size
    assert np.array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_png_keeps_alpha_and_other_modes_fall_back_to_pillow(encoder):
    rgba = noisy(31, 7, "RGBA")
    assert np.array_equal(np.asarray(decoded(png_bytes(rgba, encoder))), np.asarray(rgba))
    grey = noisy(11, 13).convert("L")
    back = decoded(png_bytes(grey, encoder))
    assert back.mode == "L" and np.array_equal(np.asarray(back), np.asarray(grey))


def test_the_server_encodes_with_fpng_when_it_is_importable():
    expected = "fpng" if importlib.util.find_spec("fpng") is not None else "pillow"
    assert expected == PNG_ENCODER
    image = noisy(65, 33)
    (png,) = encode_images([image], "png")
    assert png == encode_image(image, "png")
    assert np.array_equal(np.asarray(decoded(png)), np.asarray(image))


def test_jpeg_is_still_jpeg():
    data = encode_image(noisy(64, 48), "jpeg")
    assert Image.open(io.BytesIO(data)).format == "JPEG"
