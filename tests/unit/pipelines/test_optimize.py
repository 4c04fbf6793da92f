"""Speed and memory modes, the prompt-embedding cache, warm-up sizes and the FLOP formula, on a CPU."""

from __future__ import annotations

import sys
import threading

import httpx
import numpy as np
import pytest
import torch
from conftest import pixels
from helpers.requests import STEPS

from benchmarks.flops import FluxShape, image_tokens, transformer_flops_per_step
from benchmarks.pipeline import peak_memory
from octoflux.app import build_engine
from octoflux.cli import main as cli_main
from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.loader import load_flux_pipeline
from octoflux.pipelines.optimize import (
    OptimizationError,
    apply_optimizations,
    check_combination,
    compile_transformer,
    enable_step_cache,
    quantize_weights,
)
from octoflux.settings import Settings

CPU = torch.device("cpu")


@pytest.fixture
def tiny_pipe(load_tiny, tiny_checkpoint):
    """A fresh tiny pipeline per test: modes change it in place."""
    return load_tiny()


def spec(seeds=(3,), width=256, height=256, steps=STEPS, prompt="a lighthouse", **extra) -> GenerationSpec:
    return GenerationSpec(
        prompt=prompt, width=width, height=height, steps=steps, guidance=3.5, seeds=list(seeds), **extra
    )


def all_pixels(result) -> np.ndarray:
    return np.stack([pixels(image) for image in result.images])


# --- FLOP formula -------------------------------------------------------------------------------


def test_flop_formula_gives_about_74_tflop_per_step_at_1024():
    flops = transformer_flops_per_step(1024, 1024)
    assert 73.5e12 < flops < 75.0e12
    assert transformer_flops_per_step(1024, 1024, batch=4) == pytest.approx(4 * flops)
    assert image_tokens(1344, 768) == 84 * 48


def test_flop_formula_reads_flux_dev_config_from_the_random_full_model():
    from octoflux.pipelines.random_full import build_components

    transformer = build_components("meta", torch.bfloat16)["transformer"]
    assert FluxShape.from_config(transformer.config) == FluxShape()


def test_flop_formula_matches_torch_flop_counter_on_the_tiny_transformer(tiny_pipe):
    from torch.utils.flop_counter import FlopCounterMode

    transformer = tiny_pipe.transformer
    transformer.set_attention_backend("_native_math")  # attention as plain bmm, which the counter sees
    width = height = 256
    tokens, text = image_tokens(width, height), 512
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(
            hidden_states=torch.randn(1, tokens, 64),
            encoder_hidden_states=torch.randn(1, text, transformer.config.joint_attention_dim),
            pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([3.5]),
            img_ids=torch.zeros(tokens, 3),
            txt_ids=torch.zeros(text, 3),
        )
    expected = transformer_flops_per_step(width, height, shape=FluxShape.from_config(transformer.config))
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_random_full_has_flux_dev_parameter_counts():
    from octoflux.pipelines.random_full import build_components

    counts = {
        name: sum(p.numel() for p in model.parameters())
        for name, model in build_components("meta", torch.bfloat16).items()
    }
    assert counts == {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
    }


# --- prompt-embedding cache ---------------------------------------------------------------------


def test_prompt_cache_gives_identical_pixels_and_hits_on_repeat(tiny_pipe):
    cached, uncached = Engine(tiny_pipe, prompt_cache_size=4), Engine(tiny_pipe, prompt_cache_size=0)
    init = pixels_image = None
    for seeds in ([5], [5, 6]):
        assert np.array_equal(
            all_pixels(cached.generate(spec(seeds))), all_pixels(uncached.generate(spec(seeds)))
        )
    from PIL import Image

    pixels_image = Image.new("RGB", (256, 256), (90, 140, 200))
    init = dict(init_image=pixels_image, strength=0.6)
    assert np.array_equal(
        all_pixels(cached.generate(spec([7, 8], **init))), all_pixels(uncached.generate(spec([7, 8], **init)))
    )
    assert cached.prompt_cache.misses == 1
    assert cached.prompt_cache.hits == 2


def test_prompt_cache_is_bounded_lru_and_keyed_by_loras(tiny_pipe):
    engine = Engine(tiny_pipe, prompt_cache_size=2)
    cache = engine.prompt_cache
    with torch.inference_mode():
        for prompt in ("one", "two", "one", "three"):
            cache.embeddings(tiny_pipe, prompt)
        assert len(cache) == 2
        cache.embeddings(tiny_pipe, "one")  # kept: used more recently than "two"
        assert (cache.hits, cache.misses) == (2, 3)
        cache.embeddings(tiny_pipe, "one", (("style", 1.0),))  # another LoRA set, another entry
        assert cache.misses == 4


# --- modes --------------------------------------------------------------------------------------


def test_step_cache_with_zero_threshold_is_exact_and_computes_every_step(tiny_pipe):
    eager = all_pixels(Engine(tiny_pipe).generate(spec(steps=4)))
    counter = enable_step_cache(tiny_pipe.transformer, threshold=0.0)
    engine = Engine(tiny_pipe)
    assert np.array_equal(all_pixels(engine.generate(spec(steps=4))), eager)
    assert (counter.computed, counter.skipped) == (4, 0)


def test_step_cache_skips_steps_and_counts_them(tiny_pipe):
    settings = Settings(model="tiny", optimize="none")
    applied = apply_optimizations(tiny_pipe, settings, CPU)
    applied.step_counter = enable_step_cache(tiny_pipe.transformer, threshold=1e9)
    engine = Engine(tiny_pipe, optimizations=applied)
    for _ in range(2):
        applied.step_counter.reset()
        engine.generate(spec(steps=5))
        # The first step has nothing cached; every later one is within the huge threshold.
        assert (applied.step_counter.computed, applied.step_counter.skipped) == (1, 4)


def test_step_cache_serves_img2img_and_inpaint_too(tiny_pipe):
    """diffusers' img2img and inpaint pipelines set no cache context; First Block Cache needs one."""
    from PIL import Image

    counter = enable_step_cache(tiny_pipe.transformer, threshold=1e9)
    engine = Engine(tiny_pipe)
    init = Image.new("RGB", (256, 256), (90, 140, 200))
    mask = Image.new("L", (256, 256), 255)
    for extra in (
        {"init_image": init, "strength": 1.0},
        {"init_image": init, "mask_image": mask, "strength": 1.0},
    ):
        counter.reset()
        assert len(engine.generate(spec(steps=4, **extra)).images) == 1
        assert (counter.computed, counter.skipped) == (1, 3)


def test_cancelled_run_leaves_no_step_cache_state_behind(tiny_pipe):
    from octoflux.pipelines.engine import GenerationCancelled

    applied = apply_optimizations(tiny_pipe, Settings(model="tiny"), CPU)
    counter = applied.step_counter = enable_step_cache(tiny_pipe.transformer, threshold=1e9)
    engine = Engine(tiny_pipe, optimizations=applied)
    fresh = all_pixels(engine.generate(spec(steps=4)))
    calls = iter(range(100))
    with pytest.raises(GenerationCancelled):
        engine.generate(spec(steps=4, prompt="other"), should_stop=lambda: next(calls) >= 2)
    counter.reset()
    # Stale state would let step 0 reuse the cancelled run's residuals and skip every step.
    assert np.array_equal(all_pixels(engine.generate(spec(steps=4))), fresh)
    assert (counter.computed, counter.skipped) == (1, 3)


def test_compile_mode_fuses_qkv_uses_channels_last_and_compiles_blocks(tiny_pipe, monkeypatch):
    eager = Engine(tiny_pipe).generate(spec())
    calls = []
    monkeypatch.setattr(
        type(tiny_pipe.transformer), "compile_repeated_blocks", lambda self, **kw: calls.append(kw)
    )
    applied = apply_optimizations(tiny_pipe, Settings(model="tiny", optimize="compile"), CPU)
    assert applied.compiled and applied.step_counter is None
    assert calls == [{"fullgraph": True, "dynamic": True}]  # one graph serves every size
    attn = tiny_pipe.transformer.transformer_blocks[0].attn
    assert attn.fused_projections
    conv = next(m for m in tiny_pipe.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    fused = Engine(tiny_pipe).generate(spec())
    assert np.abs(all_pixels(fused) - all_pixels(eager)).max() <= 2  # float rounding only


def test_regional_compile_traces_the_flux_blocks_with_and_without_the_step_cache(tiny_pipe):
    """Dynamo's eager backend: whole-graph capture is checked without inductor's CPU build time."""
    torch._dynamo.reset()
    try:
        tiny_pipe.transformer.fuse_qkv_projections()
        compile_transformer(tiny_pipe.transformer, fullgraph=True, backend="eager")
        eager = all_pixels(Engine(tiny_pipe).generate(spec()))
        counter = enable_step_cache(tiny_pipe.transformer, threshold=0.0)
        compile_transformer(tiny_pipe.transformer, fullgraph=False, backend="eager")
        assert np.array_equal(all_pixels(Engine(tiny_pipe).generate(spec())), eager)
        assert counter.computed == STEPS
    finally:
        torch._dynamo.reset()


def test_fp8_mode_refuses_a_cpu_with_a_clear_error(tiny_pipe):
    with pytest.raises(OptimizationError, match="compute capability 8.9"):
        apply_optimizations(tiny_pipe, Settings(model="tiny", optimize="fp8"), CPU)


def test_weight_quantization_without_torchao_names_the_extra(tiny_pipe, monkeypatch):
    # A None entry makes `import torchao.quantization` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(OptimizationError, match=r"octoflux\[gpu\]"):
        quantize_weights(tiny_pipe.transformer, "int8")


def test_incompatible_modes_are_rejected():
    with pytest.raises(OptimizationError, match="already quantizes"):
        check_combination("fp8", "none", "int8")
    with pytest.raises(OptimizationError, match="sequential"):
        check_combination("compile", "sequential", "none")
    check_combination("cache", "model", "none")


def test_fp8_mode_configuration_is_built_and_targets_only_the_block_linears(tiny_pipe):
    """What `--optimize fp8` hands torchao, checked on a CPU (running it needs an H100-class GPU)."""
    pytest.importorskip("torchao")
    from octoflux.pipelines.optimize import _in_transformer_blocks, fp8_dynamic_config

    config = fp8_dynamic_config()
    assert type(config).__name__ == "Float8DynamicActivationFloat8WeightConfig"
    assert "PerRow" in repr(config.granularity)
    chosen = [n for n, m in tiny_pipe.transformer.named_modules() if _in_transformer_blocks(m, n)]
    assert chosen and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in chosen)
    assert not any(".norm" in n for n in chosen)
    assert any(n.endswith("attn.to_q") for n in chosen) and any(n.endswith("ff.net.2") for n in chosen)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 needs an NVIDIA GPU of compute capability 8.9+",
)
def test_fp8_mode_runs_on_a_gpu(tiny_checkpoint):
    pipe = load_flux_pipeline(tiny_checkpoint, torch.device("cuda"), torch.bfloat16)
    applied = apply_optimizations(pipe, Settings(model="tiny", optimize="fp8"), torch.device("cuda"))
    weight = pipe.transformer.transformer_blocks[0].attn.to_qkv.weight
    assert "Float8" in type(weight).__name__
    result = Engine(pipe, optimizations=applied).generate(spec())
    assert np.isfinite(all_pixels(result)).all()


def test_lora_slots_work_on_fp8_quantized_linears(load_tiny, tiny_checkpoint, tmp_path):
    """`--optimize fp8|cache` quantizes the base linears under the LoRA slots, never the factors.

    On a CPU, fp8 weight-only quantization stands in for fp8 dynamic activation quantization
    (the same float8 weight tensors; the activation kernels need an H100-class GPU).
    """
    ao = pytest.importorskip("torchao.quantization")
    from octoflux.pipelines.loras import LoraCache, LoraLibrary
    from octoflux.pipelines.optimize import quantize_block_linears
    from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

    library = LoraLibrary(tmp_path)
    save_diffusers(make_lora(1, rank=4), library.path("r4"))
    pipe = load_tiny(dtype=torch.bfloat16)
    engine = Engine(pipe, loras=LoraCache(pipe, library, slots=2, max_rank=8))
    assert quantize_block_linears(pipe.transformer, ao.Float8WeightOnlyConfig()) > 0
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert "Float8" in type(to_q.base_layer.weight).__name__
    assert type(to_q.lora_A["slot0"].weight) is torch.nn.Parameter  # factors stay plain, hot-swappable
    base = all_pixels(engine.generate(spec()))
    with_lora = all_pixels(engine.generate(spec(loras={"r4": 1.0})))
    assert np.abs(with_lora.astype(int) - base).mean() > 0.5
    assert np.array_equal(all_pixels(engine.generate(spec(loras={"r4": 0.0}))), base)


def test_memory_report_degrades_without_cuda():
    report = peak_memory(CPU)
    assert report["peak_gpu_gb"] is None and report["host_peak_rss_gb"] > 0


# --- settings, warm-up, serving -----------------------------------------------------------------


def test_cli_flags_reach_settings(monkeypatch):
    seen = {}
    monkeypatch.setattr("octoflux.cli.serve", lambda settings: seen.setdefault("settings", settings))
    cli_main(
        ["serve", "--optimize", "cache", "--cache-threshold", "0.12", "--offload", "model",
         "--attention-backend", "native", "--warmup-sizes", "1024x1024, 768x1344", "--prompt-cache-size", "0"]
    )  # fmt: skip
    settings = seen["settings"]
    assert (settings.optimize, settings.cache_threshold, settings.offload) == ("cache", 0.12, "model")
    assert settings.warmup_size_list == [(1024, 1024), (768, 1344)]
    assert settings.prompt_cache_size == 0
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        Settings(warmup_sizes="1024by1024")


def test_warmup_sizes_and_batches_default_to_every_shape_when_compiled():
    from octoflux.core.models import SUPPORTED_RESOLUTIONS

    compiled = Settings(optimize="compile", max_batch=3)
    assert compiled.warmup_size_list == list(SUPPORTED_RESOLUTIONS) and len(SUPPORTED_RESOLUTIONS) == 14
    assert compiled.warmup_batch_list == [1, 2, 3]
    eager = Settings(max_batch=3)
    assert (eager.warmup_size_list, eager.warmup_batch_list) == ([(512, 512)], [1])
    assert Settings(warmup_sizes="all").warmup_size_list == list(SUPPORTED_RESOLUTIONS)
    assert Settings(warmup_batches="1,4", max_batch=2).warmup_batch_list == [1]
    with pytest.raises(ValueError, match="integers"):
        Settings(warmup_batches="two")


def test_warmup_sizes_are_warmed_before_ready(server_factory):
    warmed = []

    def recording_engine(settings, library):
        engine = build_engine(settings, library)
        generate = engine.generate

        def record(job_spec, *args, **kwargs):
            warmed.append((job_spec.width, job_spec.height, job_spec.mode))
            return generate(job_spec, *args, **kwargs)

        engine.generate = record
        return engine

    with server_factory(engine_factory=recording_engine, warmup_sizes="768x1024,512x512") as live:
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        assert (768, 1024, "text2img") in warmed and (512, 512, "text2img") in warmed
        assert {mode for *_, mode in warmed} == {"text2img", "img2img", "inpaint"}


def test_encoding_of_one_job_overlaps_the_next_job(server_factory, monkeypatch):
    """The worker starts job N+1 while job N's images are still being encoded in the handler."""
    import octoflux.core.codec

    second_job_started = threading.Event()
    overlapped = []
    jobs = []
    encode = octoflux.core.codec.encode_image

    def slow_encode(image, encoding):
        overlapped.append(second_job_started.wait(timeout=20))
        return encode(image, encoding)

    def counting_engine(settings, library):
        engine = build_engine(settings, library)
        generate = engine.generate

        def counted(job_spec, *args, **kwargs):
            jobs.append(job_spec.prompt)
            if len(jobs) == 2:
                second_job_started.set()
            return generate(job_spec, *args, **kwargs)

        engine.generate = counted
        return engine

    with server_factory(engine_factory=counting_engine, warmup=False) as live:
        monkeypatch.setattr(octoflux.core.codec, "encode_image", slow_encode)
        body = dict(width=512, height=512, steps=1, seed=1)

        def post(prompt):
            return httpx.post(f"{live.url}/generate/flux-dev", json={**body, "prompt": prompt}, timeout=60)

        threads = [threading.Thread(target=post, args=(p,)) for p in ("first", "second")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert overlapped and overlapped[0] is True


def test_warm_up_runs_every_size_then_batches_at_the_largest_then_image_modes(tiny_pipe):
    from octoflux.pipelines.warmup import warm_up

    engine = Engine(tiny_pipe, max_batch=2)
    report = warm_up(engine, [(128, 128), (256, 128), (128, 128)], batches=[2], steps=1,
                     batches_at_every_size=False)  # fmt: skip
    runs = [(r.width, r.height, r.batch, r.mode) for r in report.runs]
    assert runs[:3] == [(256, 128, 1, "text2img"), (256, 128, 2, "text2img"), (128, 128, 1, "text2img")]
    assert runs[-2:] == [(256, 128, 1, "img2img"), (256, 128, 1, "inpaint")]
    assert report.sizes == [(256, 128), (128, 128)] and report.batches == [1, 2]
    assert report.compiles == 0  # nothing is compiled in eager mode
    assert report.throughput_spec.width == 128 and report.throughput_seconds > 0
    every = warm_up(engine, [(128, 128), (256, 128)], batches=[1, 2], steps=1, batches_at_every_size=True,
                    image_modes=False)  # fmt: skip
    assert [(r.width, r.batch) for r in every.runs] == [(256, 1), (256, 2), (128, 1), (128, 2)]
