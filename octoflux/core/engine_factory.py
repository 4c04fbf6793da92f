"""`build_engine(settings)`: the resident pipeline, its LoRA cache and speed modes, as an `Engine`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from octoflux.core import metrics
from octoflux.pipelines.engine import Engine
from octoflux.pipelines.loader import load_flux_pipeline, model_source, resolve_device, resolve_dtype
from octoflux.pipelines.loras import LoraCache, LoraLibrary
from octoflux.pipelines.optimize import apply_optimizations
from octoflux.pipelines.safety import SafetyChecker
from octoflux.settings import Settings

log = logging.getLogger(__name__)

# Given the settings and the service's LoRA library (one library object per folder).
EngineFactory = Callable[[Settings, LoraLibrary], Engine]


def build_engine(settings: Settings, library: LoraLibrary | None = None) -> Engine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    source = model_source(settings.model, settings.tiny_dir)
    log.info("loading %s on %s as %s", source, device, dtype)
    pipe = load_flux_pipeline(
        source,
        device,
        dtype,
        offload=settings.offload,
        quantize=settings.quantize,
        transformer_file=settings.transformer,
        optimize=settings.optimize,
        text_encoder_file=settings.text_encoder_2,
    )
    # Before the optimizations: a compiled transformer gets its hot-swap LoRA slots before compiling.
    loras = LoraCache(
        pipe,
        library or LoraLibrary(settings.lora_dir),
        cache_size=settings.lora_cache_size,
        max_bytes=int(settings.max_lora_mb * 2**20),
        slots=settings.lora_slots if settings.optimize != "none" else 0,
        max_rank=settings.lora_max_rank,
        on_event=metrics.lora_event_recorder(),
    )
    applied = apply_optimizations(pipe, settings, device)
    checker = SafetyChecker.load(settings.safety_checker, device, dtype) if settings.safety_checker else None
    return Engine(
        pipe,
        max_batch=settings.max_batch,
        loras=loras,
        prompt_cache_size=settings.prompt_cache_size,
        optimizations=applied,
        safety_checker=checker,
    )
