"""Every LoRA key layout diffusers' `load_lora_weights` reads, we read, with the same pixels.

The oracle is plain diffusers: a fresh `FluxPipeline` from the same tiny checkpoint,
`load_lora_weights` + `set_adapters`, called directly. Our side is the engine with its LoRA cache
(`read_lora`, our converters' follow-ups and shape checks, our PEFT attach and activation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import STEPS, pixels
from helpers.plain_diffusers import PlainDiffusers

from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.loras import LoraCache, LoraInvalid, LoraLibrary
from octoflux.pipelines.tiny_lora import (
    DOUBLE_BLOCK_TARGETS,
    make_lora,
    save_diffusers,
    save_raw,
    to_comfyui,
    to_kohya,
    to_sd_scripts,
    to_xlabs,
)

CPU = torch.device("cpu")
PROMPT, SEED, SIZE = "a lighthouse at dusk", 7, 256


def _double_blocks(text_encoder: bool) -> dict[str, torch.Tensor]:
    state = make_lora(31, transformer_targets=DOUBLE_BLOCK_TARGETS, text_encoder=True)
    return {k: v for k, v in state.items() if text_encoder or k.startswith("transformer.")}


# name → (writer of the file, components plain diffusers puts it on)
LAYOUTS = {
    "diffusers-peft": (
        lambda path: save_diffusers(make_lora(30, text_encoder=True), path),
        {"transformer", "text_encoder"},
    ),
    "kohya": (lambda path: save_raw(to_sd_scripts(_double_blocks(False)), path), {"transformer"}),
    "kohya-te1": (
        lambda path: save_raw(to_sd_scripts(_double_blocks(True)), path),
        {"transformer", "text_encoder"},
    ),
    "kohya-diffusers-names-te1": (
        lambda path: save_raw(to_kohya(make_lora(32, text_encoder=True)), path),
        {"transformer", "text_encoder"},
    ),
    "xlabs": (lambda path: save_raw(to_xlabs(_double_blocks(False)), path), {"transformer"}),
    "bfl-comfyui": (
        lambda path: save_raw(to_comfyui(_double_blocks(True)), path),
        {"transformer", "text_encoder"},
    ),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    library = LoraLibrary(tmp_path_factory.mktemp("layouts"))
    for name, (write, _) in LAYOUTS.items():
        write(library.path(name))
    return library


@pytest.fixture(scope="module")
def ours(load_tiny, tiny_checkpoint, library) -> Engine:
    pipe = load_tiny()
    return Engine(pipe, loras=LoraCache(pipe, library, cache_size=len(LAYOUTS)))


def our_image(engine: Engine, loras: dict[str, float]) -> np.ndarray:
    spec = GenerationSpec(
        prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, guidance=3.5, seeds=[SEED], loras=loras
    )
    return pixels(engine.generate(spec).images[0]).astype(np.int16)


def diffusers_image(checkpoint: str, library: LoraLibrary, loras: dict[str, float]) -> tuple[np.ndarray, set]:
    """Plain diffusers on a fresh pipeline: the image, and the components that got LoRA layers."""
    oracle = PlainDiffusers(checkpoint, library)
    return oracle.image(loras, PROMPT, SIZE, SEED), oracle.components_with_loras()


@pytest.fixture(scope="module")
def base(ours, tiny_checkpoint, library) -> np.ndarray:
    image = our_image(ours, {})
    assert np.abs(image - diffusers_image(tiny_checkpoint, library, {})[0]).max() <= 1
    return image


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_the_pixels_of_plain_diffusers(layout, ours, base, tiny_checkpoint, library):
    want, touched = diffusers_image(tiny_checkpoint, library, {layout: 0.8})
    assert touched == LAYOUTS[layout][1]
    got = our_image(ours, {layout: 0.8})
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - base).mean() > 0.5  # the LoRA really applied


def test_two_layouts_combined_give_the_pixels_of_plain_diffusers(ours, base, tiny_checkpoint, library):
    loras = {"kohya-te1": 0.6, "diffusers-peft": -0.5}
    want, _ = diffusers_image(tiny_checkpoint, library, loras)
    got = our_image(ours, loras)
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - our_image(ours, {"kohya-te1": 0.6})).mean() > 0.3


def test_a_file_diffusers_refuses_we_refuse_with_a_reason_in_words(tiny_checkpoint, library, ours, base):
    """diffusers' sd-scripts converter asserts FLUX.1's full widths on single_blocks.N.linear1 and
    raises a bare AssertionError; our refusal must still say why in a sentence."""
    from diffusers import FluxPipeline

    state = to_sd_scripts(_double_blocks(True))
    state["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.zeros(3 * 32 + 128, 4)
    save_raw(state, library.path("full-width-assert"))
    with pytest.raises(AssertionError):
        FluxPipeline.from_pretrained(tiny_checkpoint).load_lora_weights(
            str(library.path("full-width-assert"))
        )
    with pytest.raises(LoraInvalid) as refused:
        ours.loras.activate({"full-width-assert": 1.0})
    reason = str(refused.value).rpartition(": ")[2]
    assert len(reason.split()) >= 5, str(refused.value)
    assert "load_lora_weights would refuse it too" in str(refused.value)
    assert np.array_equal(our_image(ours, {}), base)  # still serving, nothing half-attached
