"""The FLUX.1 family on one server (`--model tiny-family`): Kontext edits, Fill inpaints and outpaints, dev
and schnell as before, every model sharing one set of encoders; through the OctoAI routes and the openai
client, with pixels compared against plain diffusers on the same tiny checkpoints."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import b64_to_image, gradient_image, image_to_b64, pixels
from helpers.requests import STEPS
from PIL import Image, ImageOps

from octoflux.core.models import KONTEXT_RESOLUTIONS, SUPPORTED_RESOLUTIONS
from octoflux.pipelines.family import FLUX_DEV, FLUX_FILL_DEV, FLUX_KONTEXT_DEV, FLUX_SCHNELL
from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

SEED = 7
PROMPT = "make the car red"
ALL_MODELS = [FLUX_DEV, FLUX_SCHNELL, FLUX_KONTEXT_DEV, FLUX_FILL_DEV]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("family") / "tiny-flux"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-loras")
    save_diffusers(make_lora(seed=3), folder / "dev-style.safetensors")
    # x_embedder reads 64 channels on dev and Kontext, 384 on Fill.
    save_diffusers(make_lora(seed=4, transformer_targets=["x_embedder"]), folder / "embedder.safetensors")
    return folder


@pytest.fixture(scope="module")
def family(server_factory, tiny_dir, loras):
    with server_factory(model="tiny-family", tiny_dir=tiny_dir, lora_dir=loras) as live:
        yield live


@pytest.fixture(scope="module")
def plain(tiny_dir, family):
    """Plain diffusers pipelines of the checkpoints the server wrote, called directly."""
    import diffusers

    def load(name: str, variant: str):
        pipe = getattr(diffusers, name).from_pretrained(f"{tiny_dir}-{variant}", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return {"kontext": load("FluxKontextPipeline", "kontext"), "fill": load("FluxFillPipeline", "fill")}


def generate(live, model: str, timeout: float = 120, **fields) -> httpx.Response:
    payload = {"prompt": PROMPT, "steps": STEPS, "seed": SEED, **fields}
    if "outpaint" not in fields and "width" not in fields and model != FLUX_KONTEXT_DEV:
        payload.update(width=512, height=512)
    return httpx.post(f"{live.url}/generate/{model}", json=payload, timeout=timeout)


def first_image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return b64_to_image(response.json()["images"][0]["image_b64"])


def plain_image(pipe, **kwargs) -> np.ndarray:
    out = pipe(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
        **kwargs,
    ).images[0]
    as_uint8 = (out * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return as_uint8.astype(np.int16)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1


def half_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def test_every_model_is_listed_and_ready(family):
    assert httpx.get(f"{family.url}/readyz").status_code == 200
    listed = httpx.get(f"{family.url}/v1/models").json()["data"]
    assert [card["id"] for card in listed] == ALL_MODELS


def test_the_models_share_one_set_of_encoders_and_each_has_its_transformer(family):
    engines = family.service.runtime.models.engines
    pipes = [engines[model].pipe for model in ALL_MODELS]
    for component in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        assert len({id(getattr(pipe, component)) for pipe in pipes}) == 1, component
    assert len({id(pipe.transformer) for pipe in pipes}) == 4
    # One prompt-embedding cache where the encoders are shared.
    assert len({id(engines[model].prompt_cache) for model in ALL_MODELS}) == 1


def test_kontext_edit_equals_plain_diffusers_and_depends_on_the_picture(family, plain):
    picture = gradient_image(512, 512)
    served = pixels(
        first_image(
            generate(family, FLUX_KONTEXT_DEV, init_image=image_to_b64(picture), width=512, height=512)
        )
    )
    expected = plain_image(
        plain["kontext"], image=picture, width=512, height=512, max_area=512 * 512, guidance_scale=2.5
    )
    assert close(served, expected)
    mirrored = generate(
        family, FLUX_KONTEXT_DEV, init_image=image_to_b64(ImageOps.mirror(picture)), width=512, height=512
    )
    changed = (np.abs(pixels(first_image(mirrored)) - served).max(axis=2) > 1).mean()
    assert changed > 0.5


def test_kontext_without_a_size_keeps_the_pictures_aspect_at_a_kontext_resolution(family):
    image = first_image(
        generate(family, FLUX_KONTEXT_DEV, init_image=image_to_b64(gradient_image(640, 480)), steps=1)
    )
    assert image.size == (1184, 880) and image.size in KONTEXT_RESOLUTIONS


@pytest.mark.parametrize(
    ("field", "value"), [("mask_image", "mask"), ("strength", 0.5)], ids=["mask_image", "strength"]
)
def test_kontext_refuses_a_mask_and_strength_naming_the_field(family, field, value):
    picture = image_to_b64(gradient_image(512, 512))
    extra = {field: image_to_b64(half_mask(512, 512)) if value == "mask" else value}
    response = generate(family, FLUX_KONTEXT_DEV, init_image=picture, **extra)
    assert response.status_code == 422 and field in response.text


def test_kontext_and_fill_need_an_init_image(family):
    for model in (FLUX_KONTEXT_DEV, FLUX_FILL_DEV):
        response = generate(family, model, width=512, height=512)
        assert response.status_code == 422 and "init_image" in response.text


def test_fill_inpaint_equals_plain_diffusers_and_keeps_the_unmasked_pixels(family, plain):
    picture, mask = gradient_image(512, 512), half_mask(512, 512)
    served = pixels(
        first_image(
            generate(family, FLUX_FILL_DEV, init_image=image_to_b64(picture), mask_image=image_to_b64(mask))
        )
    )
    expected = plain_image(
        plain["fill"], image=picture, mask_image=mask, width=512, height=512, guidance_scale=30.0
    )
    # The repainted half as the pipeline made it, but for the few feathered pixels along the mask's edge.
    assert close(served[:, :248], expected[:, :248])
    assert np.array_equal(served[:, 256:], pixels(picture)[:, 256:])  # the kept half, unchanged
    mirrored = pixels(
        first_image(
            generate(
                family,
                FLUX_FILL_DEV,
                init_image=image_to_b64(ImageOps.mirror(picture)),
                mask_image=image_to_b64(mask),
            )
        )
    )
    assert (np.abs(mirrored[:, :256] - served[:, :256]).max(axis=2) > 1).mean() > 0.5


def test_fill_outpaint_adds_the_border_and_keeps_the_picture(family, plain):
    picture = gradient_image(512, 512)
    response = generate(
        family,
        FLUX_FILL_DEV,
        init_image=image_to_b64(picture),
        outpaint={"left": 256, "right": 256, "top": 256, "bottom": 256},
    )
    served = pixels(first_image(response))
    assert served.shape == (1024, 1024, 3)
    assert np.array_equal(served[256:768, 256:768], pixels(picture))
    canvas = Image.new("RGB", (1024, 1024), (127, 127, 127))
    canvas.paste(picture, (256, 256))
    mask = Image.new("L", (1024, 1024), 255)
    mask.paste(0, (256, 256, 768, 768))
    expected = plain_image(
        plain["fill"], image=canvas, mask_image=mask, width=1024, height=1024, guidance_scale=30.0
    )
    assert close(served[:248], expected[:248])


def test_fill_outpaint_to_512_square_keeps_that_size_and_the_picture(family):
    picture = gradient_image(384, 512)
    served = first_image(
        generate(family, FLUX_FILL_DEV, init_image=image_to_b64(picture), outpaint={"left": 64, "right": 64})
    )
    assert served.size == (512, 512)
    assert np.array_equal(pixels(served)[:, 64:448], pixels(picture))


def test_fill_outpaint_to_an_unsupported_size_lists_the_sizes(family):
    response = generate(
        family, FLUX_FILL_DEV, init_image=image_to_b64(gradient_image(512, 512)), outpaint={"left": 100}
    )
    assert response.status_code == 422
    text = response.json()["detail"] if isinstance(response.json()["detail"], str) else response.text
    assert "outpaint" in response.text and "612x512" in text and "1024x1024" in text


def test_fill_needs_a_mask_or_outpaint_not_both(family):
    picture = image_to_b64(gradient_image(512, 512))
    neither = generate(family, FLUX_FILL_DEV, init_image=picture)
    assert neither.status_code == 422 and "mask_image" in neither.text
    both = generate(
        family,
        FLUX_FILL_DEV,
        init_image=picture,
        mask_image=image_to_b64(half_mask(512, 512)),
        outpaint={"left": 512},
    )
    assert both.status_code == 422 and "outpaint" in both.text


def test_dev_and_schnell_still_serve_text_to_image_beside_them(family):
    for model in (FLUX_DEV, FLUX_SCHNELL):
        assert first_image(generate(family, model, width=512, height=512)).size == (512, 512)


def test_a_batch_with_seeds_on_fill_gives_each_seed_its_own_image(family):
    picture, mask = image_to_b64(gradient_image(512, 512)), image_to_b64(half_mask(512, 512))
    batch = generate(
        family, FLUX_FILL_DEV, init_image=picture, mask_image=mask, num_images=2, seed=[11, 12]
    ).json()
    alone = generate(family, FLUX_FILL_DEV, init_image=picture, mask_image=mask, seed=12).json()
    assert [image["seed"] for image in batch["images"]] == [11, 12]
    assert np.array_equal(
        pixels(b64_to_image(batch["images"][1]["image_b64"])),
        pixels(b64_to_image(alone["images"][0]["image_b64"])),
    )


def test_async_kontext_job_completes_with_the_sync_pixels(family):
    picture = image_to_b64(gradient_image(512, 512))
    fields = {
        "prompt": PROMPT,
        "steps": STEPS,
        "seed": SEED,
        "init_image": picture,
        "width": 512,
        "height": 512,
    }
    accepted = httpx.post(
        f"{family.url}/generate/{FLUX_KONTEXT_DEV}", json=fields, headers={"X-OctoAI-Async": "1"}, timeout=30
    )
    assert accepted.status_code == 202, accepted.text
    poll_url = accepted.json()["poll_url"]
    deadline = time.monotonic() + 60
    while (status := httpx.get(poll_url, timeout=10).json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["status"] == "completed"
    result = httpx.get(status["response_url"], timeout=10).json()
    sync = generate(family, FLUX_KONTEXT_DEV, init_image=picture, width=512, height=512).json()
    assert result["images"][0]["image_b64"] == sync["images"][0]["image_b64"]


def test_a_dev_lora_works_on_kontext_and_is_a_422_naming_the_model_on_fill(family):
    picture = image_to_b64(gradient_image(512, 512))
    plain_kontext = generate(family, FLUX_KONTEXT_DEV, init_image=picture, width=512, height=512)
    with_lora = generate(
        family, FLUX_KONTEXT_DEV, init_image=picture, width=512, height=512, loras={"dev-style": 1.0}
    )
    assert not np.array_equal(pixels(first_image(with_lora)), pixels(first_image(plain_kontext)))
    refused = generate(
        family,
        FLUX_FILL_DEV,
        init_image=picture,
        mask_image=image_to_b64(half_mask(512, 512)),
        loras={"embedder": 1.0},
    )
    assert refused.status_code == 422
    assert "embedder" in refused.text and FLUX_FILL_DEV in refused.text
    # The same file fits dev's transformer.
    assert generate(family, FLUX_DEV, width=512, height=512, loras={"embedder": 1.0}).status_code == 200


def upload_lora(live, name: str, state: dict[str, torch.Tensor]) -> dict:
    """Create, PUT and complete an asset as the octoai SDK does; the asset as listed after."""
    from helpers.requests import LORA_DATA
    from safetensors.torch import save

    headers = {"Authorization": "Bearer any"}
    created = httpx.post(
        f"{live.url}/v1/assets", json={"asset_type": "lora", "data": LORA_DATA, "name": name}, headers=headers
    ).json()
    asset_id = created["asset"]["id"]
    content = save({key: value.contiguous() for key, value in state.items()})
    httpx.put(created["transfer_api"]["put_url"], content=content).raise_for_status()
    httpx.post(f"{live.url}/v1/assets/{asset_id}/complete-upload", json={}, headers=headers, timeout=60)
    return httpx.get(f"{live.url}/v1/assets/{asset_id}", headers=headers).json()["asset"]


def embedder_lora(live, model: str) -> dict[str, torch.Tensor]:
    """A LoRA on `model`'s x_embedder, which reads 64 channels on dev and 384 on Fill."""
    layer = live.service.runtime.models.engine(model).pipe.transformer.x_embedder
    down = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(5))
    up = torch.randn(layer.out_features, 4, generator=torch.Generator().manual_seed(6))
    return {"transformer.x_embedder.lora_A.weight": down, "transformer.x_embedder.lora_B.weight": up}


def test_an_uploaded_fill_lora_is_accepted_and_serves_fill_only(family):
    asset = upload_lora(family, "fill-embedder", embedder_lora(family, FLUX_FILL_DEV))
    assert asset["status"] == "ready", asset["status_details"]
    inpaint = dict(
        init_image=image_to_b64(gradient_image(512, 512)), mask_image=image_to_b64(half_mask(512, 512))
    )
    styled = generate(family, FLUX_FILL_DEV, loras={"fill-embedder": 1.0}, **inpaint)
    assert not np.array_equal(
        pixels(first_image(styled)), pixels(first_image(generate(family, FLUX_FILL_DEV, **inpaint)))
    )
    refused = generate(family, FLUX_DEV, loras={"fill-embedder": 1.0})
    assert refused.status_code == 422 and "fill-embedder" in refused.text and FLUX_DEV in refused.text

    fits_none = {
        key: value[:, :-1] if "lora_A" in key else value
        for key, value in embedder_lora(family, FLUX_DEV).items()
    }
    rejected = upload_lora(family, "fits-none", fits_none)
    assert rejected["status"] == "rejected"
    assert (
        f"on {FLUX_DEV}: " in rejected["status_details"]
        and f"on {FLUX_FILL_DEV}: " in rejected["status_details"]
    )


# OpenAI's Images API picks the model: `model` when given; else Kontext to edit without a mask, Fill with one.


@pytest.fixture(scope="module")
def client(family):
    return openai.OpenAI(base_url=f"{family.url}/v1", api_key="none", max_retries=0, timeout=120)


def png(image: Image.Image) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ("image.png", buffer.getvalue(), "image/png")


def openai_pixels(result) -> np.ndarray:
    return pixels(b64_to_image(result.data[0].b64_json))


def extra(**fields) -> dict:
    return {"extra_body": {"steps": STEPS, "seed": SEED, **fields}}


def test_openai_edit_without_a_mask_is_a_kontext_edit(family, client):
    picture = gradient_image(512, 512)
    result = client.images.edit(image=png(picture), prompt=PROMPT, size="512x512", **extra())
    octoai = first_image(
        generate(family, FLUX_KONTEXT_DEV, init_image=image_to_b64(picture), width=512, height=512)
    )
    assert np.array_equal(openai_pixels(result), pixels(octoai))


def test_openai_edit_with_a_mask_is_a_fill_inpaint(family, client):
    picture = gradient_image(512, 512)
    # OpenAI's polarity: fully transparent is edited.
    mask = picture.convert("RGBA")
    mask.paste((0, 0, 0, 0), (0, 0, 256, 512))
    result = client.images.edit(image=png(picture), mask=png(mask), prompt=PROMPT, size="512x512", **extra())
    octoai = generate(
        family, FLUX_FILL_DEV, init_image=image_to_b64(picture), mask_image=image_to_b64(half_mask(512, 512))
    )
    assert np.array_equal(openai_pixels(result), pixels(first_image(octoai)))


def test_openai_model_selects_dev_for_an_edit_and_unknown_models_are_400s_listing_the_served(family, client):
    picture = gradient_image(512, 512)
    result = client.images.edit(image=png(picture), prompt=PROMPT, size="512x512", model=FLUX_DEV, **extra())
    octoai = generate(family, FLUX_DEV, init_image=image_to_b64(picture), width=512, height=512)
    assert np.array_equal(openai_pixels(result), pixels(first_image(octoai)))
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt=PROMPT, model="flux-pro", **extra())
    assert refused.value.body["param"] == "model"
    assert all(model in refused.value.body["message"] for model in ALL_MODELS)


def test_openai_generate_without_a_model_uses_dev(family, client):
    result = client.images.generate(prompt=PROMPT, size="512x512", **extra())
    octoai = generate(family, FLUX_DEV, width=512, height=512)
    assert np.array_equal(openai_pixels(result), pixels(first_image(octoai)))


def test_sizes_kontext_renders_include_its_training_resolutions():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(KONTEXT_RESOLUTIONS) == PREFERRED_KONTEXT_RESOLUTIONS
    assert (1184, 880) not in SUPPORTED_RESOLUTIONS
