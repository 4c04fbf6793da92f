"""The pure request logic, no server: sizes, seeds, defaults, images, LoRA names, error mapping."""

from __future__ import annotations

import pytest
from conftest import gradient_image, image_to_b64
from PIL import Image

from octoflux.api.octoai.convert import image_request
from octoflux.api.octoai.protocol import GenerateRequest
from octoflux.core.errors import (
    CLIENT_CLOSED,
    CLIENT_GONE,
    DELETED,
    SHUTDOWN,
    TIMEOUT,
    InvalidField,
    JobCancelled,
    NotReady,
    QueueFull,
    problem,
)
from octoflux.core.models import MAX_SEED
from octoflux.core.spec import ImageLimits, build_spec, check_loras, resolve_seeds, resolve_size
from octoflux.pipelines.engine import GenerationFailed, OutOfMemory
from octoflux.pipelines.family import FAMILIES, FLUX_DEV, FLUX_SCHNELL
from octoflux.pipelines.loras import LoraLibrary, LoraNotFound

LIMITS = ImageLimits(max_bytes=32 * 2**20, max_pixels=40_000_000)


def request(**fields) -> GenerateRequest:
    return GenerateRequest(prompt="a fox", **fields)


def spec_of(body: GenerateRequest, family: str = FLUX_DEV):
    """What the OctoAI route does: decode the wire images, then build the spec for the served family."""
    return build_spec(image_request(body, LIMITS), FAMILIES[family])


def field_of(excinfo) -> str:
    return excinfo.value.field


def test_an_int_seed_gives_consecutive_seeds_that_wrap_below_two_to_the_32():
    assert resolve_seeds(7, 3) == [7, 8, 9]
    assert resolve_seeds(MAX_SEED, 2) == [MAX_SEED, 1]


def test_a_seed_list_gives_one_seed_per_image_and_draws_the_gaps():
    seeds = resolve_seeds([5, None, 9], 3)
    assert seeds[0] == 5 and seeds[2] == 9 and 0 < seeds[1] <= MAX_SEED


def test_a_seed_list_of_the_wrong_length_names_seed():
    with pytest.raises(InvalidField) as excinfo:
        resolve_seeds([1, 2], 3)
    assert field_of(excinfo) == "seed" and "2 entries" in str(excinfo.value)


def test_size_defaults_to_1024_square_and_keeps_a_supported_size():
    assert resolve_size(None, None, None) == (1024, 1024)
    assert resolve_size(1344, 768, None) == (1344, 768)


def test_size_follows_the_init_image_aspect_and_a_given_width():
    assert resolve_size(None, None, 16 / 9) == (1024, 576)  # exact 16:9; ties in aspect go to ~1 MP
    assert resolve_size(None, None, 1.75) == (1344, 768)
    assert resolve_size(832, None, 1.0) == (832, 1216)


@pytest.mark.parametrize(("width", "height", "field"), [(1000, 1000, "width"), (1024, 1000, "height")])
def test_an_unsupported_size_names_the_wrong_dimension(width, height, field):
    with pytest.raises(InvalidField) as excinfo:
        resolve_size(width, height, None)
    assert field_of(excinfo) == field and "1024x1024" in str(excinfo.value)


def test_a_mask_without_an_init_image_names_mask_image():
    with pytest.raises(InvalidField) as excinfo:
        spec_of(request(mask_image=image_to_b64(Image.new("L", (64, 64)))))
    assert field_of(excinfo) == "mask_image"


def test_a_mask_of_another_aspect_names_mask_image():
    init, mask = image_to_b64(gradient_image(64, 64)), image_to_b64(Image.new("L", (64, 32)))
    with pytest.raises(InvalidField) as excinfo:
        spec_of(request(init_image=init, mask_image=mask))
    assert field_of(excinfo) == "mask_image" and "aspect" in str(excinfo.value)


def test_an_undecodable_image_names_its_field():
    with pytest.raises(InvalidField) as excinfo:
        image_request(request(init_image="bm90IGFuIGltYWdl"), LIMITS)
    assert field_of(excinfo) == "init_image"


def test_text_to_image_defaults():
    spec = spec_of(request())
    assert (spec.width, spec.height, spec.steps, spec.guidance) == (1024, 1024, 30, 3.5)
    assert spec.mode == "text2img" and len(spec.seeds) == 1 and spec.loras == {}


def test_family_default_steps_apply_when_steps_are_omitted():
    assert spec_of(request(), FLUX_SCHNELL).steps == 4
    assert spec_of(request(steps=9), FLUX_SCHNELL).steps == 9


def test_image_to_image_fits_the_init_image_and_defaults_strength_to_0_8():
    spec = spec_of(request(init_image=image_to_b64(gradient_image(300, 200))))
    assert spec.mode == "img2img" and spec.strength == 0.8
    assert (spec.width, spec.height) == (1216, 832) and spec.init_image.size == (1216, 832)


def test_inpainting_defaults_strength_to_1_and_makes_a_grey_mask_of_the_output_size():
    init = image_to_b64(gradient_image(512, 512))
    spec = spec_of(request(init_image=init, mask_image=init, width=512, height=512))
    assert spec.mode == "inpaint" and spec.strength == 1.0
    assert spec.mask_image.mode == "L" and spec.mask_image.size == (512, 512)


def test_a_lora_without_a_weight_gets_weight_one():
    assert spec_of(request(loras={"a": None, "b": 0.5})).loras == {"a": 1.0, "b": 0.5}


def test_loras_on_a_server_without_loras_name_loras():
    with pytest.raises(InvalidField) as excinfo:
        check_loras({"style": 1.0}, None)
    assert field_of(excinfo) == "loras" and "'style'" in str(excinfo.value)


def test_a_missing_lora_file_and_a_lora_named_twice_name_loras(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"x")
    library = LoraLibrary(tmp_path)
    check_loras({"style": 1.0}, library)
    with pytest.raises(InvalidField, match="'missing'"):
        check_loras({"missing": 1.0}, library)
    with pytest.raises(InvalidField, match="named twice"):
        check_loras({"style": 1.0, "octoai:style": 0.5}, library)


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidField("seed", "bad"), 422, "validation"),
        (QueueFull(retry_after=3), 429, "queue_full"),
        (NotReady("loading", retry_after=5), 503, "not_ready"),
        (OutOfMemory("CUDA out of memory"), 503, "out_of_memory"),
        (GenerationFailed("boom"), 500, "generation_failed"),
        (LoraNotFound("style", "no such LoRA"), 422, "invalid_lora"),
        (JobCancelled(TIMEOUT, started=True), 504, "timeout"),
        (JobCancelled(SHUTDOWN, started=False), 503, "shutting_down"),
        (JobCancelled(CLIENT_GONE, started=True), CLIENT_CLOSED, "client_disconnected"),
        (JobCancelled(DELETED, started=True), 409, "cancelled"),
        (KeyError("bug"), 500, "internal"),
    ],
)
def test_every_error_maps_to_one_status_and_kind(error, status, kind):
    found = problem(error)
    assert (found.status, found.kind) == (status, kind)


def test_queue_full_carries_retry_after_and_a_bad_lora_names_loras():
    assert problem(QueueFull(retry_after=7)).retry_after == 7
    assert problem(LoraNotFound("style", "gone")).field == "loras"
