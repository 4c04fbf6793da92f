"""The compiled modes under the real inductor backend on the CPU (gcc builds the kernels).

Few tests sharing compiled state: one engine on the server's compiled path (LoRA slots, fused
nothing, regional compile) is warmed once and then probed at new sizes and over LoRA switches.
Compiles are counted with dynamo's own counters, never inferred from timings.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import pixels

from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.loras import LoraCache, LoraLibrary
from octoflux.pipelines.optimize import (
    apply_optimizations,
    compile_transformer,
    enable_step_cache,
    quantize_weights,
)
from octoflux.pipelines.tiny_lora import make_lora, save_diffusers
from octoflux.pipelines.warmup import compile_count, warm_up
from octoflux.settings import Settings

# Inductor builds C++ kernels with gcc: the first compile of the slotted blocks takes a minute or more.
pytestmark = [pytest.mark.inductor, pytest.mark.timeout(900)]

CPU = torch.device("cpu")
STEPS = 2


def spec(width=128, height=128, seeds=(3,), loras=None, steps=STEPS) -> GenerationSpec:
    return GenerationSpec(
        prompt="a lighthouse", width=width, height=height, steps=steps, guidance=3.5,
        seeds=list(seeds), loras=loras or {},
    )  # fmt: skip


def image(engine: Engine, **kw) -> np.ndarray:
    return pixels(engine.generate(spec(**kw)).images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def warmed(load_tiny, tiny_checkpoint, tmp_path_factory):
    """The server's compiled path with inductor: LoRA slots, apply_optimizations, warm_up."""
    torch._dynamo.reset()
    library = LoraLibrary(tmp_path_factory.mktemp("inductor-loras"))
    save_diffusers(make_lora(1, rank=4), library.path("r4"))
    save_diffusers(make_lora(2, rank=8, text_encoder=True), library.path("r8_clip"))
    pipe = load_tiny()
    loras = LoraCache(pipe, library, cache_size=2, slots=2, max_rank=8)
    settings = Settings(model="tiny", optimize="compile", attention_backend="native")
    applied = apply_optimizations(pipe, settings, CPU)
    engine = Engine(pipe, max_batch=1, loras=loras, optimizations=applied)
    report = warm_up(engine, [(128, 128)], batches=[1], steps=STEPS)
    yield engine, report
    torch._dynamo.reset()


def test_warm_up_reports_what_it_compiled_and_a_clean_timing(warmed):
    _, report = warmed
    assert report.compiles >= 2  # the double- and the single-block graph, at least
    assert report.modes == ["text2img", "img2img", "inpaint"]
    assert [(r.batch, r.mode) for r in report.runs if r.compiles][0] == (1, "text2img")
    assert report.throughput_spec.mode == "text2img" and len(report.throughput_spec.seeds) == 1
    assert report.throughput_seconds > 0
    assert all(r.compiles == 0 for r in report.runs if r.mode != "text2img")


def test_the_first_request_at_a_new_size_after_warm_up_compiles_nothing(warmed):
    engine, _ = warmed
    before = compile_count()
    for width, height in ((192, 128), (128, 256), (64, 192)):
        engine.generate(spec(width, height))
    assert compile_count() == before


def test_hot_swapping_loras_under_inductor_never_recompiles(warmed):
    engine, _ = warmed
    base = image(engine)
    before = compile_count()
    for loras in ({"r4": 1.0}, {"r4": 0.4}, {"r8_clip": 1.0}, {"r4": 0.7, "r8_clip": 0.5}, {}):
        got = image(engine, loras=loras)
        if loras:
            assert np.abs(got - base).mean() > 0.5, loras  # the LoRA really applied
        else:
            assert np.array_equal(got, base)
    assert compile_count() == before


def test_first_block_cache_under_inductor_runs_and_counts_skipped_steps(load_tiny, tiny_checkpoint):
    """`--optimize cache` without its fp8 step (CPU): step cache, then compile without fullgraph."""
    pipe = load_tiny()
    pipe.transformer.fuse_qkv_projections()
    counter = enable_step_cache(pipe.transformer, threshold=1e9)
    compile_transformer(pipe.transformer, fullgraph=False)
    engine = Engine(pipe, optimizations=None)
    for _ in range(2):
        counter.reset()
        pipe.transformer._reset_stateful_cache()
        result = engine.generate(spec(steps=4))
        assert np.isfinite(pixels(result.images[0])).all()
        # The first step has nothing cached; every later one is within the huge threshold.
        assert (counter.computed, counter.skipped) == (1, 3)
    before = compile_count()
    engine.generate(spec(192, 128, steps=4))
    assert compile_count() == before


@pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed (test extra)"
)
def test_int8_weight_only_quantization_runs_compiled_on_the_cpu(load_tiny, tiny_checkpoint):
    pipe = load_tiny()
    eager = image(Engine(pipe))
    quantize_weights(pipe.transformer, "int8")
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert "Int8" in type(weight).__name__
    compile_transformer(pipe.transformer, fullgraph=True)
    before = compile_count()
    quantized = image(Engine(pipe))
    assert compile_count() > before  # inductor compiled the int8 blocks
    difference = np.abs(quantized - eager)
    assert 0 < difference.mean() < 8  # int8 weights: close to float, not identical
