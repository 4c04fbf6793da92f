"""Every LoRA key layout diffusers' `load_lora_weights` reads, we read, with the same pixels.

The oracle is plain diffusers: a fresh `FluxPipeline` from the same tiny checkpoint,
`load_lora_weights` + `set_adapters`, called directly. Our side is the engine with its LoRA cache
(`read_lora`, our converters' follow-ups and shape checks, our PEFT attach and activation).
Files come in two kinds: ours rewritten in each layout (`to_*`), and random files shaped like real
trainers' output (`*_file`: every module the trainer targets, its alphas, bf16).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import pixels
from helpers.plain_diffusers import PlainDiffusers, adapter_name
from helpers.requests import STEPS

from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.loras import LoraCache, LoraInvalid, LoraLibrary
from octoflux.pipelines.tiny_lora import (
    DOUBLE_BLOCK_TARGETS,
    ai_toolkit_file,
    make_lora,
    save_diffusers,
    save_raw,
    sd_scripts_file,
    to_comfyui,
    to_kohya,
    to_sd_scripts,
    to_xlabs,
    xlabs_file,
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
    # Shaped like real trainers' output.
    "sd-scripts": (lambda path: save_raw(sd_scripts_file(50), path), {"transformer", "text_encoder"}),
    # CLIP attention and MLP keys but no out_proj: diffusers' text-encoder loader then reads the
    # MLP keys only and leaves the attention ones out; so do we.
    "sd-scripts-te1-q-fc1": (
        lambda path: save_raw(sd_scripts_file(51, clip=("self_attn_q_proj", "mlp_fc1")), path),
        {"transformer", "text_encoder"},
    ),
    # img_in/txt_in/time_in come out of diffusers' converter without the `transformer.` prefix,
    # so load_lora_weights leaves them out; so do we.
    "sd-scripts-in-dims": (
        lambda path: save_raw(sd_scripts_file(52, clip=(), embedders=True), path),
        {"transformer"},
    ),
    "comfyui": (
        lambda path: save_raw(sd_scripts_file(53, comfyui=True), path),
        {"transformer", "text_encoder"},
    ),
    "ai-toolkit": (
        lambda path: save_raw(ai_toolkit_file(54), path, metadata={"format": "pt"}),
        {"transformer"},
    ),
    "peft-with-alphas": (lambda path: save_raw(ai_toolkit_file(55, alpha=2.0), path), {"transformer"}),
    "xlabs-two-streams": (lambda path: save_raw(xlabs_file(56), path), {"transformer"}),
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


def layers_with(pipe, adapter: re.Pattern) -> set[str]:
    """`component.module` of every layer holding a LoRA whose adapter name matches `adapter`."""
    return {
        f"{component}.{name}"
        for component in ("transformer", "text_encoder")
        for name, module in getattr(pipe, component).named_modules()
        if any(adapter.fullmatch(a) for a in getattr(module, "lora_A", {}))
    }


def diffusers_layers(checkpoint: str, library: LoraLibrary, layout: str) -> set[str]:
    oracle = PlainDiffusers(checkpoint, library)
    oracle.use({layout: 1.0})
    return layers_with(oracle.pipe, re.compile(re.escape(adapter_name(layout))))


def our_layers(engine: Engine, layout: str) -> set[str]:
    engine.loras.activate({layout: 1.0})  # the cache names its adapters `<name made safe>__<n>`
    return layers_with(engine.loras.pipe, re.compile(re.escape(adapter_name(layout)) + r"__\d+"))


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


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_puts_its_layers_where_plain_diffusers_does(layout, ours, tiny_checkpoint, library):
    want = diffusers_layers(tiny_checkpoint, library, layout)
    assert want and our_layers(ours, layout) == want


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


def test_clip_keys_diffusers_cannot_read_are_refused_as_diffusers_refuses_them(
    tiny_checkpoint, library, ours, base
):
    """CLIP q_proj keys alone: diffusers' text-encoder loader cannot tell their form and raises;
    we refuse with a sentence naming the tensor, and keep serving."""
    from diffusers import FluxPipeline

    path = save_raw(sd_scripts_file(58, clip=("self_attn_q_proj",)), library.path("te1-q-only"))
    with pytest.raises(ValueError, match="infer state dict type"):
        FluxPipeline.from_pretrained(tiny_checkpoint).load_lora_weights(str(path))
    with pytest.raises(LoraInvalid) as refused:
        ours.loras.activate({"te1-q-only": 1.0})
    assert "self_attn.to_q_lora.down.weight" in str(refused.value)
    assert "load_lora_weights would refuse it too" in str(refused.value)
    assert np.array_equal(our_image(ours, {}), base)


def test_a_file_diffusers_attaches_nothing_from_is_refused_naming_a_tensor(
    tiny_checkpoint, library, ours, base
):
    """ComfyUI's `diffusion_model.` prefix over PEFT keys: diffusers' converters keep the prefix,
    so load_lora_weights silently attaches no layer; we refuse and say why."""
    from diffusers import FluxPipeline

    state = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in ai_toolkit_file(57).items()}
    path = save_raw(state, library.path("comfyui-peft-keys"))
    pipe = FluxPipeline.from_pretrained(tiny_checkpoint)
    pipe.load_lora_weights(str(path), adapter_name="comfyui")
    assert not any(hasattr(m, "lora_A") for c in (pipe.transformer, pipe.text_encoder) for m in c.modules())
    with pytest.raises(LoraInvalid) as refused:
        ours.loras.activate({"comfyui-peft-keys": 1.0})
    assert "'diffusion_model." in str(refused.value)
    assert "load_lora_weights would attach nothing" in str(refused.value)
    assert np.array_equal(our_image(ours, {}), base)
