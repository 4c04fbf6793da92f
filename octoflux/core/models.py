"""What each served model accepts: sizes, defaults, image inputs; and which model a server serves,
known before its weights have loaded where possible.

Sizes and defaults are the model's, not a dialect's: every API reads them from here.

Routes of a model this server does not serve answer 404 saying which model is served; that answer
should not wait for the model to load. Settings name the checkpoint, and its transformer config says
the family (`guidance_embeds`), so reading one small JSON file is enough:

- `tiny`, `random-full`: dev; `tiny-schnell`: schnell;
- a diffusers folder: its `transformer/config.json`;
- a hub id: that file in the local Hugging Face cache, if it is there;
- a single `.safetensors` file, or anything unreadable: unknown until the model has loaded
  (requests meanwhile get the 503 every request gets while loading).

Once loaded, the engine's own detection is what counts.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from octoflux.core.errors import InvalidField
from octoflux.core.request import ImageRequest
from octoflux.pipelines.family import FLUX_DEV, FLUX_SCHNELL, Family, family_from_transformer_config
from octoflux.pipelines.loader import RANDOM_FULL, TINY_SCHNELL

log = logging.getLogger(__name__)

# FLUX.1's resolutions (width, height), as OctoAI served them.
SUPPORTED_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (512, 512), (576, 1024), (640, 1536), (768, 1024), (768, 1344),
    (832, 1216), (896, 1152), (1024, 576), (1024, 768), (1024, 1024),
    (1152, 896), (1216, 832), (1344, 768), (1536, 640),
)  # fmt: skip
DEFAULT_SIZE = 1024
DEFAULT_GUIDANCE = 3.5
DEFAULT_STRENGTH = 0.8
# Inpainting repaints the masked area from scratch unless the caller says otherwise.
DEFAULT_INPAINT_STRENGTH = 1.0
MAX_SEED = 2**32 - 1
MAX_LORA_WEIGHT = 4.0
MAX_IMAGES = 16
MAX_STEPS = 200
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARS = 10_000

TRANSFORMER_CONFIG = "transformer/config.json"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def resolution_error(width: int | None, height: int | None, family: Family | None = None) -> str:
    listed = ", ".join(f"{w}x{h}" for w, h in SUPPORTED_RESOLUTIONS)
    title = family.title if family is not None else "FLUX.1"
    return f"{width}x{height} is not a supported {title} resolution (width x height); use one of: {listed}"


def nearest_resolution(
    aspect: float, width: int | None = None, height: int | None = None
) -> tuple[int, int] | None:
    """The supported resolution closest in aspect ratio, keeping a given width or height if any."""
    candidates = [
        (w, h)
        for w, h in SUPPORTED_RESOLUTIONS
        if (width is None or w == width) and (height is None or h == height)
    ]
    if not candidates:
        return None
    # Ties (512x512 vs 1024x1024) go to the ~1 MP size FLUX.1 was tuned for.
    return min(
        candidates,
        key=lambda wh: (
            abs(math.log(wh[0] / wh[1]) - math.log(aspect)),
            abs(wh[0] * wh[1] - DEFAULT_SIZE**2),
        ),
    )


def check_image_inputs(family: Family, request: ImageRequest) -> None:
    """`InvalidField` naming the first image input a text-to-image-only family (schnell) was sent."""
    if family.image_inputs:
        return
    given = {"init_image": request.init_image, "mask_image": request.mask_image, "strength": request.strength}
    for name, value in given.items():
        if value is not None:
            raise InvalidField(
                name, f"{name} is not supported: {family.model_id} is text-to-image only; omit it"
            )


def configured_family(model: str) -> str | None:
    """The family `--model` names, from its transformer config; None where that needs the model loaded."""
    if model in ("tiny", RANDOM_FULL):
        return FLUX_DEV
    if model == TINY_SCHNELL:
        return FLUX_SCHNELL
    config = _transformer_config(model)
    if config is None:
        return None
    try:
        return family_from_transformer_config(json.loads(config.read_text()))
    except (OSError, ValueError) as exc:
        log.warning("could not read %s to tell the model family: %s", config, exc)
        return None


def _transformer_config(model: str) -> Path | None:
    folder = Path(model)
    if folder.is_dir():
        config = folder / TRANSFORMER_CONFIG
        return config if config.is_file() else None
    if folder.exists() or "/" not in model or model.endswith(SINGLE_FILE_SUFFIXES):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, TRANSFORMER_CONFIG)
    except Exception:  # an odd id: the loader will say what is wrong with it
        return None
    return Path(cached) if isinstance(cached, str) else None
