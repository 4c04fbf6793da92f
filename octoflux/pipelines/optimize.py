"""Speed and memory modes for the resident pipeline, built from diffusers' and torchao's own features.

`--optimize` (speed, each on top of the one before):
  none     eager bf16, the reference. Lossless.
  compile  fused QKV projections, the fastest attention backend available, channels-last VAE,
           and regional torch.compile of the repeated transformer blocks (19 double + 38 single
           blocks share two compiled graphs, so compiling takes about a minute, not ten), with
           dynamic shapes: one graph pair serves every image size (see octoflux/pipelines/warmup.py).
           Lossless up to float rounding: fused matmuls and fused kernels reorder sums.
  fp8      compile + float8 (e4m3) dynamic activation and weight quantization, per-row scales,
           of the linears in the transformer blocks (torchao; needs compute capability >= 8.9,
           an H100 or L40S, and the `gpu` extra). Lossy: small, seed-for-seed changes in detail.
  cache    fp8 + First Block Cache: when the first block's residual changes by less than
           `--cache-threshold` (relative mean absolute difference) from the previous step, the
           remaining blocks are skipped and their cached residual reused. Lossy in proportion to
           the threshold and the steps skipped; the steps actually computed are reported.

`--offload` (memory): `model` keeps each model on the CPU until it runs (one model on the GPU
at a time; costs a host-to-GPU copy per model per request), `sequential` streams each layer
(fits almost anything, many times slower), `group` streams block by block with the next block
prefetched on a CUDA stream (diffusers' group offloading: near `sequential`'s memory, much faster).
Lossless.
`--quantize` (memory, applied while loading; see octoflux/pipelines/loader.py): `fp8` and `int8`
weight-only (torchao) halve the transformer and T5 weights; `nf4` (bitsandbytes, real weights
only) quarters them. Lossy: fp8/int8 weight-only are close to bf16, nf4 visibly less so.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from octoflux.pipelines import compat

log = logging.getLogger(__name__)

OPTIMIZE_MODES = ("none", "compile", "fp8", "cache")
OFFLOAD_MODES = ("none", "model", "sequential", "group")
QUANTIZE_MODES = ("none", "fp8", "int8", "nf4")
# What each mode costs in quality, reported next to its speed by the benchmark.
QUALITY_COST = {
    "none": "reference (eager; bf16 on a GPU)",
    "compile": "lossless up to float rounding",
    "fp8": "lossy: fp8 activations and weights in the transformer blocks",
    "cache": "lossy: skips transformer steps whose first-block residual barely changes",
    "offload=model": "lossless",
    "offload=sequential": "lossless",
    "offload=group": "lossless",
    "quantize=fp8": "lossy: fp8 weights (bf16 compute)",
    "quantize=int8": "lossy: int8 weights (bf16 compute)",
    "quantize=nf4": "lossy: 4-bit NormalFloat weights",
}
# Static shapes specialise one graph per (size, batch); room for every supported size x batch.
RECOMPILE_LIMIT = 64
# Whether the compiled blocks take the image-token and batch dimensions as symbolic sizes
# (one graph serves every size) or specialise a graph per shape (see docs/performance.md).
DYNAMIC_SHAPES = True


class OptimizationError(ValueError):
    """A mode cannot be applied here (missing package, unsupported combination, no suitable GPU)."""


@dataclass
class StepCounter:
    """Transformer forwards that ran every block (`computed`) or reused the cache (`skipped`)."""

    computed: int = 0
    skipped: int = 0

    def reset(self) -> None:
        self.computed = self.skipped = 0

    def record(self, computed: bool) -> None:
        if computed:
            self.computed += 1
        else:
            self.skipped += 1


@dataclass
class Applied:
    """What `apply_optimizations` did, for logs, `/metrics` and the benchmark."""

    optimize: str = "none"
    offload: str = "none"
    attention_backend: str | None = None
    compiled: bool = False
    step_counter: StepCounter | None = None
    notes: list[str] = field(default_factory=list)

    def before_generation(self, pipe) -> None:
        """Drop step-cache state a cancelled run may have left (a finished run resets its own)."""
        if self.step_counter is not None:
            compat.reset_step_cache(pipe.transformer)


def check_combination(optimize: str, offload: str, quantize: str) -> None:
    if optimize not in OPTIMIZE_MODES:
        raise OptimizationError(f"--optimize {optimize!r}: choose one of {', '.join(OPTIMIZE_MODES)}")
    if offload not in OFFLOAD_MODES:
        raise OptimizationError(f"--offload {offload!r}: choose one of {', '.join(OFFLOAD_MODES)}")
    if quantize not in QUANTIZE_MODES:
        raise OptimizationError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if optimize in ("fp8", "cache") and quantize != "none":
        raise OptimizationError(
            f"--optimize {optimize} already quantizes the transformer to fp8; drop --quantize {quantize}"
        )
    if offload in ("sequential", "group") and optimize != "none":
        raise OptimizationError(
            f"--offload {offload} streams weights block by block; use it with --optimize none"
        )


def apply_optimizations(
    pipe, settings, device: torch.device | None = None, *, dynamic_shapes: bool = DYNAMIC_SHAPES
) -> Applied:
    """Apply `settings.optimize`, `.offload` and `.attention_backend` to a loaded pipeline, in place."""
    check_combination(settings.optimize, settings.offload, settings.quantize)
    device = device or pipe.transformer.device
    applied = Applied(optimize=settings.optimize, offload=settings.offload)
    transformer = pipe.transformer
    applied.attention_backend = set_attention_backend(transformer, settings.attention_backend, device)
    if settings.optimize != "none":
        if getattr(transformer, "peft_config", None):
            # LoRA slots (pipelines/loras/slots.py) wrap to_q/to_k/to_v; a fused to_qkv would bypass them.
            applied.notes.append("QKV left unfused: LoRA slots target to_q/to_k/to_v")
        else:
            # Fuse before quantizing: fusion concatenates the q/k/v weight matrices.
            transformer.fuse_qkv_projections()
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.optimize in ("fp8", "cache"):
        quantize_fp8_dynamic(transformer, device)
    if settings.optimize == "cache":
        applied.step_counter = enable_step_cache(transformer, settings.cache_threshold)
    if settings.optimize != "none":
        # The step cache decides on the host between blocks (a graph break), so only its
        # absence allows fullgraph.
        compile_transformer(transformer, fullgraph=settings.optimize != "cache", dynamic=dynamic_shapes)
        applied.compiled = True
    if settings.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif settings.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif settings.offload == "group":
        enable_group_offload(pipe, device)
    log.log(logging.INFO if applied.optimize != "none" else logging.DEBUG, "optimizations: %s", applied)
    return applied


def enable_group_offload(pipe, device: torch.device) -> None:
    """diffusers' group offloading, one block per group; on CUDA the next group is copied on a side
    stream while the current one runs (on a CPU there is nothing to copy: the hooks run, streams do not)."""
    streams = device.type == "cuda"
    pipe.enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=streams,
        non_blocking=streams,
    )


def set_attention_backend(transformer, requested: str, device: torch.device) -> str | None:
    """Route attention through diffusers' dispatcher; "auto" picks FlashAttention 3/2 when installed."""
    backend = requested
    if requested == "auto":
        backend = _fastest_installed_backend(device)
    if backend in (None, "native"):
        return "native"  # torch SDPA, which picks its own flash / memory-efficient kernel
    try:
        transformer.set_attention_backend(backend)
    except Exception as exc:
        if requested != "auto":
            raise OptimizationError(f"attention backend {backend!r} is not usable here: {exc}") from exc
        log.warning("attention backend %s failed (%s); keeping torch SDPA", backend, exc)
        return "native"
    return backend


def _fastest_installed_backend(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    if importlib.util.find_spec("flash_attn_interface") is not None:  # FlashAttention 3 (Hopper)
        return "_flash_3"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return None


def compile_transformer(transformer, fullgraph: bool = True, **compile_kwargs) -> None:
    """Regional compilation: each repeated block class is compiled once and reused 19/38 times."""
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    else:  # torch < 2.6
        config.cache_size_limit = max(config.cache_size_limit, RECOMPILE_LIMIT)
    compile_kwargs.setdefault("dynamic", DYNAMIC_SHAPES)
    transformer.compile_repeated_blocks(fullgraph=fullgraph, **compile_kwargs)


def _torchao():
    try:
        import torchao.quantization as quantization
    except ImportError as exc:
        raise OptimizationError(
            "this mode needs torchao: pip install 'octoflux[gpu]' (a torchao release built for your torch)"
        ) from exc
    return quantization


def _in_transformer_blocks(module: torch.nn.Module, name: str) -> bool:
    """Attention and MLP linears of the blocks: all the FLOPs. The AdaLN modulation linears
    (`.norm*.linear`) see one token per image, gain nothing from fp8 and steer every activation."""
    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and ".norm" not in name
        and ".lora_" not in name  # LoRA slot factors are hot-swapped in place: they stay in bf16
    )


def quantize_fp8_dynamic(transformer, device: torch.device) -> int:
    """float8 e4m3 activations and weights, per-row scales, for the linears in the blocks."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise OptimizationError("--optimize fp8 needs an NVIDIA GPU of compute capability 8.9 or newer")
    return quantize_block_linears(transformer, fp8_dynamic_config())


def fp8_dynamic_config():
    ao = _torchao()
    return ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow())


def quantize_block_linears(transformer, config) -> int:
    """Quantize the blocks' attention and MLP linears with a torchao config; returns how many.

    LoRA slots (PEFT) wrap a targeted linear as `base_layer` plus `lora_A`/`lora_B` factors: the
    base is quantized like any other linear, the factors stay in the compute dtype so that
    hot-swapping copies plain weights into them. Checked here, since a quantized factor would
    make every later swap fail.
    """
    ao = _torchao()
    chosen = [name for name, module in transformer.named_modules() if _in_transformer_blocks(module, name)]
    ao.quantize_(transformer, config, filter_fn=_in_transformer_blocks)
    for name, module in transformer.named_modules():
        if (
            ".lora_" in name
            and isinstance(module, torch.nn.Linear)
            and type(module.weight) is not torch.nn.Parameter
        ):
            raise OptimizationError(f"LoRA slot factor {name} was quantized; slots must stay unquantized")
    return len(chosen)


def quantize_weights(module: torch.nn.Module, kind: str) -> None:
    """Weight-only quantization of an in-memory model's linears (the random-full weights)."""
    if kind == "none":
        return
    if kind == "nf4":
        raise OptimizationError(
            "--quantize nf4 quantizes while loading real weights (bitsandbytes); "
            "with random weights use --quantize fp8 or int8"
        )
    ao = _torchao()
    config = ao.Float8WeightOnlyConfig() if kind == "fp8" else ao.Int8WeightOnlyConfig()
    ao.quantize_(module, config)


def loading_quantization_config(kind: str, dtype: torch.dtype):
    """A diffusers PipelineQuantizationConfig that quantizes the transformer and T5 as they load."""
    from diffusers import PipelineQuantizationConfig

    if kind == "none":
        return None
    if kind == "nf4":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptimizationError("--quantize nf4 needs bitsandbytes: pip install 'octoflux[gpu]'")
        return PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit",
            quant_kwargs={
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": dtype,
            },
            components_to_quantize=["transformer", "text_encoder_2"],
        )
    ao = _torchao()
    from diffusers import TorchAoConfig
    from transformers import TorchAoConfig as TransformersTorchAoConfig

    make = ao.Float8WeightOnlyConfig if kind == "fp8" else ao.Int8WeightOnlyConfig
    return PipelineQuantizationConfig(
        quant_mapping={
            "transformer": TorchAoConfig(make()),
            "text_encoder_2": TransformersTorchAoConfig(make()),
        }
    )


def enable_step_cache(transformer, threshold: float) -> StepCounter:
    """diffusers' First Block Cache, with a counter of the transformer forwards it computed in full.

    First Block Cache rather than MagCache or TaylorSeer: it adapts to any step count and
    checkpoint with no calibration (MagCache needs magnitude ratios measured per checkpoint and
    step count; TaylorSeer skips on a fixed interval whatever the content).
    """
    from diffusers import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    counter = StepCounter()
    compat.observe_first_block_cache(transformer, counter.record)
    _default_cache_context(transformer, compat.cache_context_check(transformer))
    return counter


def _default_cache_context(transformer, context_is_set: Callable[[], bool]) -> None:
    """FluxPipeline names the cache context of its denoiser call; diffusers' img2img and inpaint
    pipelines do not, and First Block Cache refuses to run without one. Their calls get the
    context text-to-image uses."""
    forward = transformer.forward

    @functools.wraps(forward)
    def forward_in_context(*args, **kwargs):
        if context_is_set():
            return forward(*args, **kwargs)
        with transformer.cache_context("cond"):
            return forward(*args, **kwargs)

    transformer.forward = forward_in_context
