"""`build_models(settings)`: the served models, each a resident pipeline with its LoRA cache and speed
modes, as a `ModelSet`; components several models share are loaded once. `build_engine`: one model."""

from __future__ import annotations

import logging
from collections.abc import Callable

from octoflux.core import metrics
from octoflux.pipelines.engine import Engine
from octoflux.pipelines.family import detect_family
from octoflux.pipelines.loader import (
    ModelLoadError,
    load_flux_pipeline,
    model_source,
    resolve_device,
    resolve_dtype,
)
from octoflux.pipelines.loras import LoraCache, LoraLibrary
from octoflux.pipelines.model_list import ModelEntry
from octoflux.pipelines.model_set import ModelSet
from octoflux.pipelines.optimize import apply_optimizations
from octoflux.pipelines.parallel import enable_context_parallel, parse_layout
from octoflux.pipelines.prompt_cache import PromptEmbeddingCache
from octoflux.pipelines.safety import SafetyChecker
from octoflux.pipelines.shared_components import SharedComponents
from octoflux.settings import Settings

log = logging.getLogger(__name__)

# Given the settings and the service's LoRA library (one library object per folder); an `Engine` is
# taken as a set of one.
EngineFactory = Callable[[Settings, LoraLibrary], ModelSet | Engine]


def check_model_set(settings: Settings) -> list[ModelEntry]:
    """The entries `--model` names, or `ModelLoadError` for what several models cannot combine with."""
    entries = settings.model_entries
    if len(entries) > 1:
        for flag, value in (
            ("--transformer", settings.transformer),
            ("--text-encoder-2", settings.text_encoder_2),
        ):
            if value:
                raise ModelLoadError(f"{flag} serves one model; with several, write ID=BASE+FILE in --model")
        if settings.offload != "none":
            raise ModelLoadError("--offload serves one model; serve several without it, or one per server")
    return entries


def build_engine(settings: Settings, library: LoraLibrary | None = None) -> Engine:
    """The one model `--model` names (the first of several: `build_models` builds them all)."""
    return build_models(settings, library).default


def build_models(settings: Settings, library: LoraLibrary | None = None) -> ModelSet:
    entries = check_model_set(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    parts = _Parts(
        library=library or LoraLibrary(settings.lora_dir),
        shared=SharedComponents() if len(entries) > 1 else None,
        prompt_cache=PromptEmbeddingCache(settings.prompt_cache_size)
        if settings.prompt_cache_size > 0
        else None,
        checker=SafetyChecker.load(settings.safety_checker, device, dtype)
        if settings.safety_checker
        else None,
    )
    engines: dict[str, Engine] = {}
    for entry in entries:
        engine = _build_model(settings, entry, device, dtype, parts)
        if engine.family in engines:
            raise ModelLoadError(
                f"--model serves {engine.family} twice ({entry.source}); serve each model once"
            )
        engines[engine.family] = engine
    models = ModelSet(engines, parts.shared.shared_with if parts.shared is not None else None)
    if len(engines) > 1:
        log.info("serving %s", describe_sharing(models))
    return models


class _Parts:
    """What every model of the set is built with."""

    def __init__(self, library, shared, prompt_cache, checker):
        self.library: LoraLibrary = library
        self.shared: SharedComponents | None = shared
        self.prompt_cache: PromptEmbeddingCache | None = prompt_cache
        self.checker: SafetyChecker | None = checker


def describe_sharing(models: ModelSet) -> str:
    """One line: the models, and which loaded components each takes from another."""
    parts = []
    for model_id in models.engines:
        by_owner: dict[str, list[str]] = {}
        for component, owner in models.shared_with.get(model_id, {}).items():
            by_owner.setdefault(owner, []).append(component)
        shared = "; ".join(f"{', '.join(names)} shared with {owner}" for owner, names in by_owner.items())
        parts.append(f"{model_id} ({shared})" if shared else model_id)
    return ", ".join(parts)


def _build_model(settings: Settings, entry: ModelEntry, device, dtype, parts: _Parts) -> Engine:
    source = model_source(entry.source, settings.tiny_dir)
    given, owners = parts.shared.reusable(source) if parts.shared is not None else ({}, {})
    log.info(
        "loading %s%s on %s as %s%s",
        f"{entry.id} from " if entry.id else "",
        source,
        device,
        dtype,
        f" (sharing {', '.join(sorted(given))})" if given else "",
    )
    pipe = load_flux_pipeline(
        source,
        device,
        dtype,
        offload=settings.offload,
        quantize=settings.quantize,
        transformer_file=entry.transformer_file,
        optimize=settings.optimize,
        text_encoder_file=settings.text_encoder_2,
        shared=given,
    )
    family = detect_family(pipe)
    if entry.transformer_file and entry.id is not None:
        family = entry.id  # a Kontext file has dev's tensors: the id given says which it is
    if entry.id is not None and family != entry.id:
        raise ModelLoadError(
            f"--model {entry.id}={entry.source}: that checkpoint is {family}, not {entry.id}"
        )
    if parts.shared is not None:
        parts.shared.remember(family, source, pipe, owners)
    layout = parse_layout(settings.context_parallel)
    if layout is not None:  # the ranks' process group is joined first (octoflux/deploy/context_parallel.py)
        enable_context_parallel(pipe.transformer, layout)
    # Before the optimizations: a compiled transformer gets its hot-swap LoRA slots before compiling.
    loras = LoraCache(
        pipe,
        parts.library,
        cache_size=settings.lora_cache_size,
        max_bytes=int(settings.max_lora_mb * 2**20),
        slots=settings.lora_slots if settings.optimize != "none" else 0,
        max_rank=settings.lora_max_rank,
        on_event=metrics.lora_event_recorder(),
    )
    applied = apply_optimizations(pipe, settings, device)
    return Engine(
        pipe,
        max_batch=settings.max_batch,
        loras=loras,
        prompt_cache_size=0,
        optimizations=applied,
        family=family,
        safety_checker=parts.checker,
        prompt_cache=parts.prompt_cache,
    )
