"""Load a FLUX pipeline: the tiny model, random-full, a diffusers-format folder, a hub id, or a file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from octoflux.pipelines.model_list import TINY_FAMILY as TINY_FAMILY
from octoflux.pipelines.model_list import TINY_MODELS
from octoflux.pipelines.model_list import TINY_SCHNELL as TINY_SCHNELL
from octoflux.pipelines.model_paths import FLUX_COMPONENTS as FLUX_COMPONENTS
from octoflux.pipelines.model_paths import RANDOM_FULL as RANDOM_FULL
from octoflux.pipelines.model_paths import ModelLoadError as ModelLoadError
from octoflux.pipelines.model_paths import ModelNotFound as ModelNotFound
from octoflux.pipelines.model_paths import check_model_source as check_model_source
from octoflux.pipelines.tiny import tiny_checkpoint_is_complete, write_tiny_checkpoint

log = logging.getLogger(__name__)

PIPELINE_CLASSES = ("FluxPipeline", "FluxKontextPipeline", "FluxFillPipeline")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU, float32 on a CPU (bf16 matmuls are slow on most CPUs), unless told."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def ensure_tiny_checkpoint(cache_dir: Path, variant: str = "dev") -> Path:
    """Write the tiny checkpoint once; later calls reuse it."""
    if not tiny_checkpoint_is_complete(cache_dir, variant):
        log.info("writing the tiny random-weight FLUX (%s) checkpoint to %s", variant, cache_dir)
        staging = cache_dir.with_name(cache_dir.name + ".partial")
        write_tiny_checkpoint(staging, variant)
        if cache_dir.exists():
            import shutil

            shutil.rmtree(cache_dir)
        staging.rename(cache_dir)
    return cache_dir


def model_source(model: str, tiny_dir: Path) -> str:
    """Turn `--model` into what diffusers loads: a folder, a file, or a hub id."""
    variant = TINY_MODELS.get(model)
    if variant == "dev":
        return str(ensure_tiny_checkpoint(tiny_dir))
    if variant is not None:
        # Beside the tiny dev (tiny-flux -> tiny-flux-schnell), so rebuilding one never removes the other.
        return str(ensure_tiny_checkpoint(tiny_dir.with_name(f"{tiny_dir.name}-{variant}"), variant))
    return model


def pipeline_class_name(source: str) -> str:
    """The FLUX pipeline class a folder's (or cached hub id's) model_index.json names; FluxPipeline
    where it names none of the three served."""
    index = _model_index(source)
    name = index.get("_class_name") if index else None
    return name if name in PIPELINE_CLASSES else "FluxPipeline"


def _model_index(source: str) -> dict | None:
    import json

    path = Path(source).expanduser() / "model_index.json"
    if not path.is_file():
        if Path(source).expanduser().exists() or source.count("/") != 1:
            return None
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(source, "model_index.json")
        except Exception:
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_transformer_base(source: str, flag: str = "--transformer") -> None:
    """`--transformer FILE` (or `--text-encoder-2 FILE`) takes everything else from a diffusers folder or
    hub id."""
    if source == RANDOM_FULL or Path(source).is_file():
        raise ModelLoadError(
            f"{flag} needs --model to be a diffusers-format folder or hub id, not {source!r}"
        )


def load_flux_pipeline(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    offload: str = "none",
    quantize: str = "none",
    transformer_file: str = "",
    optimize: str = "none",
    text_encoder_file: str = "",
    shared: dict | None = None,
):
    """Load a FluxPipeline from random-full, a diffusers folder, a single-file checkpoint, or a hub id.

    A folder or hub id loads as the pipeline class its model_index.json names (Kontext, Fill); `shared`
    are already loaded components (by pipeline name) it takes instead of reading its own.

    With `offload` the pipeline stays on the CPU: octoflux.pipelines.optimize installs the offload hooks.
    `quantize` quantizes the transformer and T5 weights while loading (see octoflux.pipelines.optimize).
    `transformer_file` (GGUF, fp8 or bf16; octoflux.pipelines.single_file) replaces the base's transformer,
    `text_encoder_file` (octoflux.pipelines.text_encoder_file) its T5 encoder.
    """
    from diffusers import FluxPipeline

    from octoflux.pipelines.optimize import loading_quantization_config

    _progress_as_log_lines()
    shared = shared or {}
    if transformer_file or text_encoder_file:
        files = _load_files(source, transformer_file, text_encoder_file, dtype, optimize, quantize)
        return _from_pretrained(source, device, dtype, offload, **shared, **files)
    if source == RANDOM_FULL:
        return _random_full(device if offload == "none" else torch.device("cpu"), dtype, quantize)
    path = Path(source)
    if path.is_file():
        if quantize != "none":
            raise ModelLoadError("--quantize needs a diffusers-format folder or hub id, not a single file")
        try:
            pipe = FluxPipeline.from_single_file(str(path), torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load FLUX from {source!r}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe if offload != "none" else pipe.to(device)
    if not (path.is_dir() or "/" in source):
        raise ModelLoadError(
            f"--model {source!r} is neither 'tiny', 'random-full', a folder, a file nor a hub id"
        )
    quantization = loading_quantization_config(quantize, dtype)
    return _from_pretrained(source, device, dtype, offload, quantization_config=quantization, **shared)


def _from_pretrained(source: str, device: torch.device, dtype: torch.dtype, offload: str, **given):
    """`from_pretrained` of the folder's pipeline class, logging each component it loads (components in
    `given` are not read)."""
    import diffusers

    from octoflux.pipelines.load_progress import ComponentProgress

    pipeline_class = getattr(diffusers, pipeline_class_name(source))
    try:
        with ComponentProgress(source):
            pipe = pipeline_class.from_pretrained(source, dtype=dtype, **given)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load FLUX from {source!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe if offload != "none" else pipe.to(device)


def _progress_as_log_lines() -> None:
    """diffusers' and transformers' loading bars off: progress is logged as lines (load_progress.py)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _load_files(
    source: str,
    transformer_file: str,
    text_encoder_file: str,
    dtype: torch.dtype,
    optimize: str,
    quantize: str,
) -> dict:
    """The components given as files, checked and loaded, by their pipeline names."""
    loaded = {}
    if transformer_file:
        from octoflux.pipelines.single_file import check_transformer_file, load_transformer_file

        check_transformer_base(source)
        found = check_transformer_file(transformer_file, source, optimize=optimize, quantize=quantize)
        loaded["transformer"] = load_transformer_file(found, source, dtype)
    if text_encoder_file:
        from octoflux.pipelines.text_encoder_file import (
            FLAG,
            check_text_encoder_file,
            load_text_encoder_file,
        )

        check_transformer_base(source, FLAG)
        found_t5 = check_text_encoder_file(text_encoder_file, source, quantize=quantize)
        loaded["text_encoder_2"] = load_text_encoder_file(found_t5, source, dtype)
    return loaded


def _random_full(device: torch.device, dtype: torch.dtype, quantize: str):
    """FLUX.1-dev's architecture with random weights, built where it will run (no download)."""
    from octoflux.pipelines.optimize import quantize_weights
    from octoflux.pipelines.random_full import build_random_full_pipeline

    log.info("building random-weight FLUX.1-dev on %s as %s", device, dtype)
    pipe = build_random_full_pipeline(device, dtype)
    for model in (pipe.transformer, pipe.text_encoder_2):
        quantize_weights(model, quantize)
    return pipe
