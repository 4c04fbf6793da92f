"""Which FLUX.1 family (dev or schnell) a server serves, known before its model has loaded where possible.

Routes of the other family answer 404 saying which model is served; that answer should not wait for
the model to load. Settings name the checkpoint, and its transformer config says the family
(`guidance_embeds`), so reading one small JSON file is enough:

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
from pathlib import Path

from PIL import Image

from octoflux.api.octoai.protocol import GenerateRequest
from octoflux.core.errors import InvalidField, NotFound
from octoflux.pipelines.family import FLUX_DEV, FLUX_SCHNELL, Family, family_from_transformer_config
from octoflux.pipelines.loader import RANDOM_FULL, TINY_SCHNELL

log = logging.getLogger(__name__)

TRANSFORMER_CONFIG = "transformer/config.json"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


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


def not_served(asked: str, served: str) -> NotFound:
    """The 404 for a route (or model id) of the family this server does not serve."""
    return NotFound(
        f"this server serves {served} (POST /generate/{served}), not {asked}; "
        f"start one with a {asked} checkpoint to use this route"
    )


def check_family_fields(
    family: Family, request: GenerateRequest, init: Image.Image | None = None, mask: Image.Image | None = None
) -> None:
    """`InvalidField` naming the first image input a text-to-image-only family (schnell) was sent."""
    if family.image_inputs:
        return
    given = {
        "init_image": init if init is not None else request.init_image,
        "mask_image": mask if mask is not None else request.mask_image,
        "strength": request.strength,
    }
    for name, value in given.items():
        if value is not None:
            message = f"{name} is not supported: {family.model_id} is text-to-image only; omit it"
            raise InvalidField(name, message)
