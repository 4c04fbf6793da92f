"""The three modes through the official octoai SDK over real HTTP, against the tiny FLUX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import b64_to_image, gradient_image, image_to_b64, pixels
from helpers.requests import STEPS
from PIL import Image, ImageOps

from octoflux.core.models import MAX_SEED

# With 2 steps diffusers' img2img starts from pure noise for strength 0.6 and 0.8 alike (the init
# image is ignored); 8 steps at strength 0.6 start at step 3, where the init image shapes the output.
IMG2IMG_STEPS = 8

# Batch vs single run of one seed: the measured worst case on the tiny model is 1/255
# (a handful of pixels off by one after rounding); anything more is not float noise.
BATCH_VS_SINGLE_MAX_ABS = 1
SIZES = [(1024, 1024), (512, 512), (1536, 640), (576, 1024)]


def generate(sdk, **fields):
    fields.setdefault("steps", STEPS)
    return sdk.image_gen.generate_flux_dev(prompt=fields.pop("prompt", "a red fox in snow"), **fields)


def images_of(response) -> list[Image.Image]:
    return [b64_to_image(item.image_b64) for item in response.images]


def half_mask(width: int, height: int) -> Image.Image:
    """Black (keep) on the left half, white (repaint) on the right half."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    return mask


def black_mask(width: int, height: int) -> Image.Image:
    return Image.new("L", (width, height), 0)


@pytest.fixture(scope="module")
def plain_diffusers(tiny_checkpoint):
    """The checkpoint loaded by plain diffusers in the test process: the reference output."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return pipe, img2img


# --- text-to-image ---------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_text_to_image_returns_png_of_requested_size(sdk, width, height):
    response = generate(sdk, width=width, height=height, seed=3)
    (image,) = images_of(response)
    assert (image.format, image.size, image.mode) == ("PNG", (width, height), "RGB")
    assert response.images[0].seed == 3
    assert response.images[0].removed_for_safety is False
    assert response.prediction_time_ms > 0
    assert pixels(image).std() > 1  # a picture, not a blank canvas


def test_text_to_image_defaults_to_1024x1024(sdk):
    (image,) = images_of(generate(sdk, seed=1))
    assert image.size == (1024, 1024)


def test_request_gives_exactly_the_pixels_of_plain_diffusers(sdk, plain_diffusers):
    pipe, _ = plain_diffusers
    cases = [
        dict(seed=42, fields={}, kwargs=dict(guidance_scale=3.5, height=1024, width=1024)),
        dict(
            seed=7,
            fields=dict(cfg_scale=7.0, width=768, height=1344),
            kwargs=dict(guidance_scale=7.0, height=1344, width=768),
        ),
    ]
    for case in cases:
        (served,) = images_of(generate(sdk, prompt="a lighthouse", seed=case["seed"], **case["fields"]))
        reference = pipe(
            prompt="a lighthouse",
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            num_inference_steps=STEPS,
            **case["kwargs"],
        ).images[0]
        assert np.array_equal(pixels(served), pixels(reference)), case


def test_img2img_gives_exactly_the_pixels_of_plain_diffusers(sdk, plain_diffusers):
    _, img2img = plain_diffusers
    init, mirrored = gradient_image(512, 512), ImageOps.mirror(gradient_image(512, 512))
    fields = dict(prompt="a boat", seed=9, strength=0.6, width=512, height=512, steps=IMG2IMG_STEPS)
    served = images_of(generate(sdk, init_image=image_to_b64(init), **fields))[0]
    reference = img2img(
        prompt="a boat",
        image=init,
        strength=0.6,
        generator=torch.Generator("cpu").manual_seed(9),
        num_inference_steps=IMG2IMG_STEPS,
        guidance_scale=3.5,
        height=512,
        width=512,
    ).images[0]
    assert np.array_equal(pixels(served), pixels(reference))
    # The comparison means something only if the init image shapes the output.
    other = images_of(generate(sdk, init_image=image_to_b64(mirrored), **fields))[0]
    assert np.abs(pixels(other) - pixels(served)).mean() > 1


def test_same_request_twice_gives_identical_pixels(sdk):
    first, second = (images_of(generate(sdk, width=512, height=512, seed=11))[0] for _ in range(2))
    assert np.array_equal(pixels(first), pixels(second))


def test_different_seeds_give_different_images(sdk):
    a, b = (images_of(generate(sdk, width=512, height=512, seed=s))[0] for s in (1, 2))
    assert np.abs(pixels(a) - pixels(b)).mean() > 5


def test_prompt_changes_the_image(sdk):
    a, b = (images_of(generate(sdk, prompt=p, width=512, height=512, seed=5))[0] for p in ("cat", "dog"))
    assert not np.array_equal(pixels(a), pixels(b))


def test_cfg_scale_changes_the_image(sdk):
    a, b = (images_of(generate(sdk, width=512, height=512, seed=5, cfg_scale=c))[0] for c in (1.0, 30.0))
    assert not np.array_equal(pixels(a), pixels(b))


# --- encoding -----------------------------------------------------------------------------------


def test_jpeg_encoding_returns_jpeg_close_to_the_png(sdk):
    png = images_of(generate(sdk, width=512, height=512, seed=4, image_encoding="png"))[0]
    jpeg = images_of(generate(sdk, width=512, height=512, seed=4, image_encoding="jpeg"))[0]
    assert (png.format, jpeg.format) == ("PNG", "JPEG")
    assert jpeg.size == (512, 512)
    # Same image, lossy: not identical, but far closer than another seed's image (~48 apart).
    other = images_of(generate(sdk, width=512, height=512, seed=5))[0]
    to_jpeg, to_other = np.abs(pixels(png) - pixels(jpeg)).mean(), np.abs(pixels(png) - pixels(other)).mean()
    assert 0 < to_jpeg < to_other / 2


# --- seeds and batches --------------------------------------------------------------------------


def test_int_seed_gives_consecutive_seeds(sdk):
    response = generate(sdk, width=512, height=512, num_images=3, seed=100)
    assert [item.seed for item in response.images] == [100, 101, 102]
    assert len({pixels(img).tobytes() for img in images_of(response)}) == 3


def test_int_seed_wraps_below_2_pow_32(sdk):
    response = generate(sdk, width=512, height=512, num_images=2, seed=MAX_SEED)
    assert [item.seed for item in response.images] == [MAX_SEED, 1]


def test_absent_seed_draws_a_seed_per_image(sdk):
    response = generate(sdk, width=512, height=512, num_images=2)
    seeds = [item.seed for item in response.images]
    assert all(isinstance(s, int) and 0 < s <= MAX_SEED for s in seeds)
    assert seeds[0] != seeds[1]


def test_seed_list_with_nulls_returns_given_and_drawn_seeds(sdk):
    response = generate(sdk, width=512, height=512, num_images=3, seed=[5, None, 7])
    seeds = [item.seed for item in response.images]
    assert seeds[0] == 5 and seeds[2] == 7
    assert 0 < seeds[1] <= MAX_SEED
    # The drawn seed is the one actually used: running it alone reproduces that image.
    drawn = images_of(generate(sdk, width=512, height=512, seed=seeds[1]))[0]
    assert np.abs(pixels(drawn) - pixels(images_of(response)[1])).max() <= BATCH_VS_SINGLE_MAX_ABS


@pytest.mark.parametrize(
    ("width", "height", "seeds"),
    [
        # 6 images with max_batch=4: two pipeline batches of different sizes.
        (512, 512, [31, 7, 2**32 - 1, 12345, 8, 99]),
        (1536, 640, [31, 2**32 - 1]),
    ],
)
def test_image_k_of_a_batch_equals_its_seed_run_alone(sdk, width, height, seeds):
    batch = generate(sdk, width=width, height=height, num_images=len(seeds), seed=seeds)
    assert [item.seed for item in batch.images] == seeds
    worst = 0
    for seed, image in zip(seeds, images_of(batch), strict=True):
        alone = images_of(generate(sdk, width=width, height=height, seed=seed))[0]
        worst = max(worst, int(np.abs(pixels(image) - pixels(alone)).max()))
    print(f"batch vs single at {width}x{height}: max abs diff {worst}/255")
    assert worst <= BATCH_VS_SINGLE_MAX_ABS


# --- image-to-image -----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), SIZES[:3])
def test_img2img_returns_requested_size_and_differs_from_init(sdk, width, height):
    init = gradient_image(width, height)
    response = generate(sdk, init_image=image_to_b64(init), strength=0.8, width=width, height=height, seed=2)
    (image,) = images_of(response)
    assert (image.format, image.size) == ("PNG", (width, height))
    assert np.abs(pixels(image) - pixels(init)).mean() > 1


def test_img2img_depends_on_init_image(sdk):
    outputs = [
        images_of(generate(sdk, init_image=image_to_b64(init), strength=0.5, seed=2, width=512, height=512))[
            0
        ]
        for init in (gradient_image(512, 512), ImageOps.mirror(gradient_image(512, 512)))
    ]
    assert not np.array_equal(pixels(outputs[0]), pixels(outputs[1]))


def test_img2img_output_depends_on_strength(sdk):
    init = image_to_b64(gradient_image(512, 512))
    # With 2 steps, strength 0.3 runs the last step only and 0.9 runs both.
    weak, strong = (
        images_of(generate(sdk, init_image=init, strength=s, seed=2, width=512, height=512))[0]
        for s in (0.3, 0.9)
    )
    assert np.abs(pixels(weak) - pixels(strong)).mean() > 1


def test_init_image_of_another_size_is_fitted_to_requested_size(sdk):
    init = image_to_b64(gradient_image(300, 700))
    (image,) = images_of(generate(sdk, init_image=init, width=1344, height=768, seed=2))
    assert image.size == (1344, 768)


@pytest.mark.parametrize(
    ("init_size", "expected"),
    [
        ((1600, 900), (1024, 576)),  # 16:9 exactly
        ((900, 1600), (576, 1024)),
        ((700, 700), (1024, 1024)),  # square goes to the ~1 MP size, not 512x512
        ((2000, 800), (1536, 640)),
        ((1200, 900), (1024, 768)),
    ],
)
def test_absent_size_with_init_image_picks_nearest_supported_aspect(sdk, init_size, expected):
    init = image_to_b64(gradient_image(*init_size), "JPEG")
    (image,) = images_of(generate(sdk, init_image=init, strength=0.5, steps=1, seed=1))
    assert image.size == expected


def test_width_alone_with_init_image_keeps_width_and_picks_height(sdk):
    init = image_to_b64(gradient_image(1600, 900), "JPEG")
    (image,) = images_of(generate(sdk, init_image=init, width=1344, steps=1, seed=1))
    assert image.size == (1344, 768)


# --- inpainting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), SIZES[:3])
def test_inpaint_keeps_unmasked_pixels_and_changes_masked_ones(sdk, width, height):
    init = gradient_image(width, height)
    response = generate(
        sdk,
        init_image=image_to_b64(init),
        mask_image=image_to_b64(half_mask(width, height)),
        width=width,
        height=height,
        seed=3,
    )
    (image,) = images_of(response)
    assert (image.format, image.size) == ("PNG", (width, height))
    got, want = pixels(image), pixels(init)
    left, right = slice(0, width // 2), slice(width // 2 + 8, width)  # skip the feathered edge
    assert np.array_equal(got[:, left], want[:, left])
    changed = np.any(got[:, right] != want[:, right], axis=-1)
    assert changed.mean() > 0.9


def test_inpaint_keeps_unmasked_pixels_of_fitted_init_image(sdk):
    # 800x800 init and mask, requested at 512x512: both are scaled, the kept pixels are
    # those of the scaled init image.
    init, mask = gradient_image(800, 800), half_mask(800, 800)
    (image,) = images_of(
        generate(
            sdk,
            init_image=image_to_b64(init),
            mask_image=image_to_b64(mask),
            width=512,
            height=512,
            seed=3,
        )
    )
    fitted = ImageOps.fit(init, (512, 512), method=Image.Resampling.LANCZOS)
    keep = slice(0, 256 - 4)  # away from the resampled mask edge
    assert np.array_equal(pixels(image)[:, keep], pixels(fitted)[:, keep])
    assert np.any(pixels(image)[:, 300:] != pixels(fitted)[:, 300:], axis=-1).mean() > 0.9


def test_inpaint_without_size_follows_init_aspect(sdk):
    init = gradient_image(900, 1600)
    (image,) = images_of(
        generate(sdk, init_image=image_to_b64(init), mask_image=image_to_b64(half_mask(450, 800)), seed=3)
    )
    assert image.size == (576, 1024)


# --- input image formats ------------------------------------------------------------------------
# Inpainting with an all-black mask returns the (fitted) input unchanged, so it shows exactly
# how the server decoded the input image.


def decoded_by_server(sdk, init_b64: str, width: int, height: int) -> Image.Image:
    response = generate(
        sdk,
        init_image=init_b64,
        mask_image=image_to_b64(black_mask(width, height)),
        width=width,
        height=height,
        steps=1,
        seed=1,
    )
    return images_of(response)[0]


def test_init_image_accepts_data_url_prefix(sdk):
    init = gradient_image(512, 512)
    plain = image_to_b64(init)
    fields = dict(strength=0.6, seed=6, width=512, height=512, steps=IMG2IMG_STEPS)
    without = images_of(generate(sdk, init_image=plain, **fields))[0]
    for prefix in ("data:image/png;base64,", "data:image/jpeg;base64,"):
        with_prefix = images_of(generate(sdk, init_image=prefix + plain, **fields))[0]
        assert np.array_equal(pixels(with_prefix), pixels(without))
    mirrored = image_to_b64(ImageOps.mirror(init))
    other = images_of(generate(sdk, init_image="data:image/png;base64," + mirrored, **fields))[0]
    assert np.abs(pixels(other) - pixels(without)).mean() > 1  # the prefixed image was really used
    assert np.array_equal(
        pixels(decoded_by_server(sdk, "data:image/png;base64," + plain, 512, 512)), pixels(init)
    )


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_init_image_accepts_png_jpeg_and_webp(sdk, fmt):
    init_b64 = image_to_b64(gradient_image(512, 512), fmt)
    expected = b64_to_image(init_b64).convert("RGB")
    assert np.array_equal(pixels(decoded_by_server(sdk, init_b64, 512, 512)), pixels(expected))


def test_rgba_input_is_composited_on_white(sdk):
    rgba = gradient_image(512, 512).convert("RGBA")
    half = Image.new("L", (512, 512), 255)
    half.paste(0, (0, 0, 256, 512))  # left half fully transparent
    rgba.putalpha(half)
    got = pixels(decoded_by_server(sdk, image_to_b64(rgba), 512, 512))
    assert np.all(got[:, :256] == 255)
    assert np.array_equal(got[:, 256:], pixels(gradient_image(512, 512))[:, 256:])


def test_grayscale_input_becomes_rgb(sdk):
    gray = gradient_image(512, 512).convert("L")
    got = pixels(decoded_by_server(sdk, image_to_b64(gray), 512, 512))
    assert np.array_equal(got, pixels(gray.convert("RGB")))


def test_cmyk_jpeg_input_becomes_rgb(sdk):
    cmyk = gradient_image(512, 512).convert("CMYK")
    data = image_to_b64(cmyk, "JPEG", quality=95)
    expected = b64_to_image(data).convert("RGB")
    got = decoded_by_server(sdk, data, 512, 512)
    assert np.array_equal(pixels(got), pixels(expected))


def test_16_bit_grayscale_input_is_scaled_to_8_bit(sdk):
    ramp = np.linspace(0, 65535, 512, dtype=np.float64).round().astype(np.uint16)
    image16 = Image.fromarray(np.broadcast_to(ramp, (512, 512)).copy())
    assert image16.mode == "I;16"
    got = pixels(decoded_by_server(sdk, image_to_b64(image16), 512, 512))
    expected = (ramp >> 8).astype(np.int16)
    assert np.array_equal(got[0, :, 0], expected)
    assert np.array_equal(got[..., 0], got[..., 2])


def test_exif_rotated_jpeg_is_turned_upright(sdk):
    # Stored 800x400 landscape with EXIF orientation 6 (rotate 90° clockwise to display):
    # upright it is a 400x800 portrait, so the nearest supported size is 576x1024.
    stored = gradient_image(800, 400)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = image_to_b64(stored, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(b64_to_image(data))
    assert upright.size == (400, 800)
    response = generate(
        sdk,
        init_image=data,
        mask_image=image_to_b64(black_mask(400, 800)),
        steps=1,
        seed=1,
    )
    (image,) = images_of(response)
    assert image.size == (576, 1024)
    expected = ImageOps.fit(upright.convert("RGB"), (576, 1024), method=Image.Resampling.LANCZOS)
    assert np.array_equal(pixels(image), pixels(expected))
