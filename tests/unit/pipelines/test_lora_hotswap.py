"""LoRA slots under torch.compile: hot-swapping LoRAs and weights never recompiles, on a CPU.

Dynamo's `eager` backend, wrapped in a CompileCounter, traces exactly what inductor would be
given (same guards, same recompiles) without inductor's CPU build time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pixels
from helpers.plain_diffusers import PlainDiffusers
from helpers.requests import STEPS
from torch._dynamo.testing import CompileCounter

import octoflux.pipelines.optimize as optimize
from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.loras import LoraCache, LoraInvalid, LoraLibrary
from octoflux.pipelines.tiny_lora import DOUBLE_BLOCK_TARGETS, make_lora, save_diffusers, save_raw, to_kohya
from octoflux.settings import Settings

CPU = torch.device("cpu")
MAX_RANK = 16


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    library = LoraLibrary(tmp_path_factory.mktemp("loras"))
    save_diffusers(make_lora(1, rank=4), library.path("r4"))
    save_diffusers(make_lora(2, rank=8, text_encoder=True), library.path("r8_clip"))
    save_raw(to_kohya(make_lora(3, rank=2)), library.path("r2_kohya"))
    save_diffusers(make_lora(4, rank=MAX_RANK, transformer_targets=DOUBLE_BLOCK_TARGETS), library.path("r16"))
    save_diffusers(make_lora(5, rank=MAX_RANK + 1), library.path("too_big"))
    return library


PROMPT, SIZE, SEED = "a lighthouse", 256, 3


def spec(loras: dict[str, float]) -> GenerationSpec:
    return GenerationSpec(
        prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, guidance=3.5, seeds=[SEED], loras=loras
    )


def image(engine: Engine | PlainDiffusers, loras: dict[str, float]) -> np.ndarray:
    if isinstance(engine, PlainDiffusers):
        return engine.image(loras, PROMPT, SIZE, SEED)
    return pixels(engine.generate(spec(loras)).images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, library) -> PlainDiffusers:
    """Plain diffusers, none of our LoRA code: load_lora_weights once per LoRA, set_adapters weights."""
    return PlainDiffusers(tiny_checkpoint, library)


@pytest.fixture(scope="module")
def compiled(load_tiny, tiny_checkpoint, library):
    """The server's compiled path (slots, then apply_optimizations), traced by dynamo's eager backend."""
    pipe = load_tiny()
    cache = LoraCache(pipe, library, cache_size=2, slots=2, max_rank=MAX_RANK)
    counter = CompileCounter()
    real = optimize.compile_transformer
    optimize.compile_transformer = lambda t, **kw: real(t, backend=counter, **kw)
    try:
        settings = Settings(model="tiny", optimize="compile", attention_backend="native")
        applied = optimize.apply_optimizations(pipe, settings, CPU)
    finally:
        optimize.compile_transformer = real
    return Engine(pipe, loras=cache, optimizations=applied), counter


SEQUENCE = [
    {"r4": 1.0},
    {"r4": 0.5},
    {"r8_clip": 1.0},
    {"r4": 0.7, "r8_clip": 1.0},
    {"r2_kohya": 1.0},
    {"r16": 1.2, "r2_kohya": 0.3},
    {"r8_clip": 0.0},
    {"r4": 1.0},  # evicted from the cache (size 2) meanwhile: read and swapped in again
    {},
]


def test_switching_loras_and_weights_never_recompiles_and_matches_eager(compiled, reference):
    engine, counter = compiled
    assert not any(getattr(m, "fused_projections", False) for m in engine.pipe.transformer.modules())
    base = image(engine, {})  # warm-up: compiles the double- and the single-block graph
    warm = counter.frame_count
    assert warm == 2
    assert np.abs(base - image(reference, {})).max() <= 1  # channels-last VAE rounds differently
    for loras in SEQUENCE:
        got, want = image(engine, loras), image(reference, loras)
        assert counter.frame_count == warm, f"recompiled after {loras}"
        assert np.abs(got - want).max() <= 1, loras
        if any(loras.values()):
            assert np.abs(got - base).mean() > 0.5, loras  # the LoRA really applied
    assert engine.loras.stats.evictions >= 1
    for _ in range(3):  # the base output is unchanged after many swaps
        assert np.array_equal(image(engine, {}), base)
    assert counter.frame_count == warm


def test_slot_mode_refuses_more_loras_than_slots_and_ranks_above_the_maximum(compiled):
    engine, counter = compiled
    frames = counter.frame_count
    with pytest.raises(LoraInvalid, match="at most 2 per request"):
        engine.loras.activate({"r4": 1.0, "r8_clip": 1.0, "r2_kohya": 1.0})
    with pytest.raises(LoraInvalid, match="rank 17.*up to 16"):
        engine.loras.activate({"too_big": 1.0})
    base = image(engine, {})
    assert np.abs(image(engine, {"r4": 1.0}) - base).mean() > 0.5  # still serving after refusals
    assert counter.frame_count == frames


def test_slots_at_weight_zero_give_the_base_pixels_exactly(load_tiny, tiny_checkpoint, library, reference):
    pipe = load_tiny()
    engine = Engine(pipe, loras=LoraCache(pipe, library, slots=2, max_rank=MAX_RANK))
    base = image(reference, {})
    assert np.array_equal(image(engine, {}), base)
    image(engine, {"r4": 1.0, "r16": 0.5})
    assert np.array_equal(image(engine, {"r4": 0.0}), base)
    assert np.array_equal(image(engine, {}), base)


def test_the_counter_sees_recompiles_without_slots(load_tiny, tiny_checkpoint, library):
    """Control: adding PEFT adapters to a compiled transformer, the non-slot way, does recompile."""
    pipe = load_tiny()
    counter = CompileCounter()
    optimize.compile_transformer(pipe.transformer, fullgraph=True, backend=counter)
    engine = Engine(pipe, loras=LoraCache(pipe, library))
    image(engine, {})
    warm = counter.frame_count
    image(engine, {"r4": 1.0})
    assert counter.frame_count > warm
