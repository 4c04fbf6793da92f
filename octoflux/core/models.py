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
from octoflux.pipelines.family import FAMILIES, FLUX_KONTEXT_DEV, Family, family_from_transformer_config
from octoflux.pipelines.model_list import TINY_FAMILY_MODELS, ModelListError, parse_model_list
from octoflux.pipelines.model_paths import RANDOM_FULL

log = logging.getLogger(__name__)

# FLUX.1's resolutions (width, height), as OctoAI served them.
SUPPORTED_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (512, 512), (576, 1024), (640, 1536), (768, 1024), (768, 1344),
    (832, 1216), (896, 1152), (1024, 576), (1024, 768), (1024, 1024),
    (1152, 896), (1216, 832), (1344, 768), (1536, 640),
)  # fmt: skip
# FLUX.1 Kontext was trained at these (diffusers' PREFERRED_KONTEXT_RESOLUTIONS); it renders the above too.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
    (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
    (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
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


def resolutions(family: Family | None) -> tuple[tuple[int, int], ...]:
    """The sizes a model renders: FLUX.1's, and Kontext's own besides on Kontext."""
    if family is not None and family.model_id == FLUX_KONTEXT_DEV:
        return SUPPORTED_RESOLUTIONS + tuple(r for r in KONTEXT_RESOLUTIONS if r not in SUPPORTED_RESOLUTIONS)
    return SUPPORTED_RESOLUTIONS


def resolution_error(width: int | None, height: int | None, family: Family | None = None) -> str:
    listed = ", ".join(f"{w}x{h}" for w, h in resolutions(family))
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
    """`InvalidField` naming the first image input a model does not take (schnell: none; Kontext: no mask
    or strength; only Fill outpaints), or the init image it needs (Kontext, Fill)."""
    given = {
        "init_image": request.init_image,
        "mask_image": request.mask_image,
        "strength": request.strength,
        "outpaint": request.outpaint,
    }
    if not family.image_inputs:
        refused = ("init_image", "mask_image", "strength", "outpaint")
        why = "is text-to-image only"
    elif family.model_id == FLUX_KONTEXT_DEV:
        refused, why = ("mask_image", "strength", "outpaint"), "edits the whole image by instruction"
    elif family.needs_image:  # Fill
        refused, why = (), ""
    else:
        refused, why = ("outpaint",), "does not outpaint (FLUX.1-Fill-dev does)"
    for name in refused:
        if given[name] is not None:
            raise InvalidField(name, f"{name} is not supported: {family.model_id} {why}; omit it")
    if family.needs_image and request.init_image is None:
        raise InvalidField("init_image", f"init_image is required: {family.model_id} works on an image")


def configured_models(model: str) -> list[str] | None:
    """The model ids `--model` names, from their transformer configs (and model_index.json); None where
    that needs a model loaded."""
    try:
        entries = parse_model_list(model)
    except ModelListError:
        return None
    ids: list[str] = []
    for entry in entries:
        model_id = entry.id or configured_family(entry.source)
        if model_id is None:
            return None
        ids.append(model_id)
    return ids


def configured_family(model: str) -> str | None:
    """The family `--model` names, from its transformer config; None where that needs the model loaded."""
    tiny = {source: model_id for model_id, source in TINY_FAMILY_MODELS.items()}
    if model in tiny:
        return tiny[model]
    if model == RANDOM_FULL:
        return "flux-dev"
    config = _transformer_config(model)
    if config is None:
        return None
    try:
        index = config.parent.parent / "model_index.json"
        pipeline_class = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        family = family_from_transformer_config(json.loads(config.read_text()), pipeline_class)
    except (OSError, ValueError) as exc:
        log.warning("could not read %s to tell the model family: %s", config, exc)
        return None
    return family if family in FAMILIES else None


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
