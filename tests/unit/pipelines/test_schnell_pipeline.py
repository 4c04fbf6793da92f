"""FLUX.1-schnell: the tiny schnell on disk, family detection, its defaults, and pixels equal to diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gradient_image, pixels
from PIL import Image

from octoflux import cli
from octoflux.pipelines.engine import Engine, GenerationSpec, ModeNotOffered
from octoflux.pipelines.family import (
    FAMILIES,
    FLUX_DEV,
    FLUX_SCHNELL,
    detect_family,
    family_from_transformer_config,
)
from octoflux.pipelines.loader import load_flux_pipeline, model_source
from octoflux.pipelines.tiny import tiny_checkpoint_is_complete

CPU = torch.device("cpu")
SIZE = 256  # small: these tests compare pipelines, not resolutions


@pytest.fixture(scope="module")
def schnell_checkpoint(tmp_path_factory) -> str:
    """The tiny schnell, written by the CLI as a user would."""
    target = tmp_path_factory.mktemp("tiny-schnell")
    cli.main(["make-tiny", "--variant", "schnell", str(target)])
    return str(target)


@pytest.fixture(scope="module")
def schnell_engine(schnell_checkpoint) -> Engine:
    return Engine(load_flux_pipeline(schnell_checkpoint, CPU, torch.float32))


@pytest.fixture(scope="module")
def plain_schnell(schnell_checkpoint):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(schnell_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spec(**fields) -> GenerationSpec:
    base = dict(prompt="a red fox in snow", width=SIZE, height=SIZE, steps=4, guidance=3.5, seeds=[5])
    return GenerationSpec(**(base | fields))


def test_make_tiny_schnell_has_no_guidance_embedding_and_a_fixed_shift(schnell_checkpoint):
    transformer = json.loads((Path(schnell_checkpoint) / "transformer" / "config.json").read_text())
    scheduler = json.loads((Path(schnell_checkpoint) / "scheduler" / "scheduler_config.json").read_text())
    assert transformer["guidance_embeds"] is False
    assert (scheduler["use_dynamic_shifting"], scheduler["shift"]) == (False, 1.0)


def test_family_is_detected_from_the_transformer_config(load_tiny, schnell_engine, tiny_checkpoint):
    assert schnell_engine.family == FLUX_SCHNELL
    assert detect_family(load_tiny()) == FLUX_DEV
    assert family_from_transformer_config({"guidance_embeds": True}) == FLUX_DEV
    assert family_from_transformer_config({"guidance_embeds": False}) == FLUX_SCHNELL


def test_family_defaults_schnell_4_steps_text_only_dev_30_steps_all_modes():
    schnell, dev = FAMILIES[FLUX_SCHNELL], FAMILIES[FLUX_DEV]
    assert (schnell.default_steps, schnell.guidance, schnell.modes) == (4, False, ("text2img",))
    assert (dev.default_steps, dev.guidance, dev.modes) == (30, True, ("text2img", "img2img", "inpaint"))
    assert (schnell.model_id, dev.model_id) == ("flux-schnell", "flux-dev")


def test_model_tiny_schnell_is_written_once_beside_the_tiny_dev(tmp_path):
    tiny_dir = tmp_path / "tiny-flux"
    source = Path(model_source("tiny-schnell", tiny_dir))
    assert source == tmp_path / "tiny-flux-schnell" and tiny_checkpoint_is_complete(source)
    weights = source / "transformer" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert Path(model_source("tiny-schnell", tiny_dir)) == source
    assert weights.stat().st_mtime_ns == written
    assert not tiny_dir.exists()  # the dev default is untouched until asked for
    pipe = load_flux_pipeline(str(source), CPU, torch.float32)
    assert detect_family(pipe) == FLUX_SCHNELL


def test_schnell_pixels_equal_plain_diffusers(schnell_engine, plain_schnell):
    seeds = [11, 12]
    result = schnell_engine.generate(spec(seeds=seeds))
    for seed, ours in zip(seeds, result.images, strict=True):
        (reference,) = plain_schnell(
            "a red fox in snow",
            width=SIZE,
            height=SIZE,
            num_inference_steps=4,
            guidance_scale=0.0,
            max_sequence_length=256,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images
        assert np.abs(pixels(ours).astype(int) - pixels(reference).astype(int)).max() <= 1


def test_diffusers_ignores_guidance_without_a_guidance_embedding(plain_schnell, schnell_engine):
    def run(guidance: float) -> np.ndarray:
        (image,) = plain_schnell(
            "a fox",
            width=SIZE,
            height=SIZE,
            num_inference_steps=2,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images
        return pixels(image)

    assert np.array_equal(run(0.0), run(12.0))
    low, high = (schnell_engine.generate(spec(steps=2, guidance=g)).images[0] for g in (1.0, 20.0))
    assert np.array_equal(pixels(low), pixels(high))


def test_schnell_encodes_prompts_to_256_t5_tokens(schnell_engine):
    schnell_engine.generate(spec(prompt="token count probe", steps=1))
    embeds, _ = schnell_engine.prompt_cache.embeddings(
        schnell_engine.pipe, "token count probe", max_sequence_length=256
    )
    assert schnell_engine.prompt_cache.hits >= 1  # the engine's run cached exactly this entry
    assert embeds.shape[1] == 256


@pytest.mark.parametrize("with_mask", [False, True])
def test_schnell_engine_refuses_image_inputs(schnell_engine, with_mask):
    init = gradient_image(SIZE, SIZE)
    mask = Image.new("L", (SIZE, SIZE), 255) if with_mask else None
    with pytest.raises(ModeNotOffered, match="flux-schnell offers text2img"):
        schnell_engine.generate(spec(init_image=init, mask_image=mask))


def test_family_can_be_given_to_the_engine(schnell_engine):
    assert Engine(schnell_engine.pipe, family=FLUX_SCHNELL).family == FLUX_SCHNELL
    with pytest.raises(ValueError, match="unknown model family"):
        Engine(schnell_engine.pipe, family="flux-pro")


def test_warm_up_on_schnell_runs_text_to_image_only(schnell_engine):
    from octoflux.core.queue import JobQueue
    from octoflux.core.runtime import warm_up
    from octoflux.settings import Settings

    settings = Settings(warmup_sizes="256x256", warmup_steps=1)
    jobs = JobQueue(4)
    warm_up(schnell_engine, settings, jobs)  # img2img/inpaint would raise ModeNotOffered
    assert jobs._seconds_per_unit is not None
