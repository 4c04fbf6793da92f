"""Load a FLUX pipeline: the tiny model, random-full, a diffusers-format folder, a hub id, or a file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipelines.tiny import tiny_checkpoint_is_complete, write_tiny_checkpoint

log = logging.getLogger(__name__)

RANDOM_FULL = "random-full"
TINY_SCHNELL = "tiny-schnell"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded."""


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
    if not tiny_checkpoint_is_complete(cache_dir):
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
    if model == "tiny":
        return str(ensure_tiny_checkpoint(tiny_dir))
    if model == TINY_SCHNELL:
        # Beside the tiny dev (tiny-flux -> tiny-flux-schnell), so rebuilding one never removes the other.
        return str(ensure_tiny_checkpoint(tiny_dir.with_name(tiny_dir.name + "-schnell"), "schnell"))
    return model


def load_flux_pipeline(
    source: str, device: torch.device, dtype: torch.dtype, offload: str = "none", quantize: str = "none"
):
    """Load a FluxPipeline from random-full, a diffusers folder, a single-file checkpoint, or a hub id.

    With `offload` the pipeline stays on the CPU: pipelines.optimize installs the offload hooks.
    `quantize` quantizes the transformer and T5 weights while loading (see pipelines.optimize).
    """
    from diffusers import FluxPipeline

    from pipelines.optimize import loading_quantization_config

    if source == RANDOM_FULL:
        return _random_full(device if offload == "none" else torch.device("cpu"), dtype, quantize)
    path = Path(source)
    try:
        if path.is_file():
            if quantize != "none":
                raise ModelLoadError(
                    "--quantize needs a diffusers-format folder or hub id, not a single file"
                )
            pipe = FluxPipeline.from_single_file(str(path), torch_dtype=dtype)
        elif path.is_dir() or "/" in source:
            quantization = loading_quantization_config(quantize, dtype)
            pipe = FluxPipeline.from_pretrained(source, dtype=dtype, quantization_config=quantization)
        else:
            raise ModelLoadError(
                f"--model {source!r} is neither 'tiny', 'random-full', a folder, a file nor a hub id"
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load FLUX from {source!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe if offload != "none" else pipe.to(device)


def _random_full(device: torch.device, dtype: torch.dtype, quantize: str):
    """FLUX.1-dev's architecture with random weights, built where it will run (no download)."""
    from pipelines.optimize import quantize_weights
    from pipelines.random_full import build_random_full_pipeline

    log.info("building random-weight FLUX.1-dev on %s as %s", device, dtype)
    pipe = build_random_full_pipeline(device, dtype)
    for model in (pipe.transformer, pipe.text_encoder_2):
        quantize_weights(model, quantize)
    return pipe
