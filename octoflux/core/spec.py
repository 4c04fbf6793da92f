"""A validated request becomes a `GenerationSpec`: images decoded and fitted, defaults, sizes, seeds.

Pure functions, no HTTP and no model: each raises `InvalidField` naming the field it cannot use.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from PIL import Image

from octoflux.api.octoai.protocol import (
    DEFAULT_GUIDANCE,
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_SEED,
    SUPPORTED_RESOLUTIONS,
    GenerateRequest,
    nearest_resolution,
    resolution_error,
)
from octoflux.core.codec import ImageDecodeError, decode_image, fit
from octoflux.core.errors import InvalidField, problem
from octoflux.pipelines.engine import GenerationSpec
from octoflux.pipelines.loras import LoraError, LoraLibrary, lora_name

ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def resolve_seeds(seed: int | list[int | None] | None, num_images: int) -> list[int]:
    """An int gives seed, seed+1, ...; a list gives one seed per image; gaps are drawn at random."""
    if isinstance(seed, int):
        return [(seed - 1 + i) % MAX_SEED + 1 for i in range(num_images)]
    if seed is None:
        seed = [None] * num_images
    if len(seed) != num_images:
        raise InvalidField("seed", f"seed list has {len(seed)} entries but num_images is {num_images}")
    return [s if s is not None else secrets.randbelow(MAX_SEED) + 1 for s in seed]


def resolve_size(width: int | None, height: int | None, init_aspect: float | None) -> tuple[int, int]:
    """The requested size, the default, or (with an init image) the supported size nearest its aspect."""
    if width is not None and height is not None:
        size = (width, height)
    elif init_aspect is None:
        size = (width or DEFAULT_SIZE, height or DEFAULT_SIZE)
    else:
        size = nearest_resolution(init_aspect, width, height)
        if size is None:
            raise InvalidField("width" if width is not None else "height", resolution_error(width, height))
    if size not in SUPPORTED_RESOLUTIONS:
        bad_width = size[0] not in {w for w, _ in SUPPORTED_RESOLUTIONS}
        raise InvalidField("width" if bad_width else "height", resolution_error(*size))
    return size


def decode_inputs(
    init_b64: str | None, mask_b64: str | None, limits: ImageLimits
) -> tuple[Image.Image | None, Image.Image | None]:
    if mask_b64 is not None and init_b64 is None:
        raise InvalidField("mask_image", "mask_image needs init_image (inpainting edits an existing image)")
    bounds = dict(max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    try:
        init = decode_image(init_b64, "init_image", **bounds) if init_b64 is not None else None
        mask = decode_image(mask_b64, "mask_image", **bounds) if mask_b64 is not None else None
    except ImageDecodeError as exc:
        raise InvalidField(exc.field, str(exc)) from None
    if init is not None and mask is not None:
        check_same_aspect(init, mask)
    return init, mask


def check_same_aspect(init: Image.Image, mask: Image.Image, field: str = "mask_image") -> None:
    if abs((init.width / init.height) / (mask.width / mask.height) - 1) > ASPECT_TOLERANCE:
        raise InvalidField(
            field,
            f"{field} is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
            "their aspect ratios must match",
        )


def build_spec(
    req: GenerateRequest,
    limits: ImageLimits,
    *,
    default_steps: int = DEFAULT_STEPS,
    init: Image.Image | None = None,
    mask: Image.Image | None = None,
) -> GenerationSpec:
    """Decode images (unless given decoded) and apply defaults; `InvalidField` for anything unusable."""
    if init is None and mask is None:
        init, mask = decode_inputs(req.init_image, req.mask_image, limits)
    width, height = resolve_size(req.width, req.height, init.width / init.height if init else None)
    strength = req.strength or (DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_STRENGTH)
    return GenerationSpec(
        prompt=req.prompt,
        width=width,
        height=height,
        steps=req.steps or default_steps,
        guidance=req.cfg_scale if req.cfg_scale is not None else DEFAULT_GUIDANCE,
        seeds=resolve_seeds(req.seed, req.num_images or 1),
        init_image=fit(init, width, height) if init is not None else None,
        mask_image=fit(mask, width, height).convert("L") if mask is not None else None,
        strength=strength,
        loras={name: 1.0 if weight is None else weight for name, weight in (req.loras or {}).items()},
    )


def check_loras(loras: dict[str, float], library: LoraLibrary | None) -> None:
    """`InvalidField` on `loras` naming the first LoRA without a file, with a bad name, or named twice."""
    seen: dict[str, str] = {}
    for ref in loras:
        if library is None:
            raise InvalidField("loras", f"unknown LoRA {ref!r}: this server serves no LoRAs")
        try:
            library.resolve(ref)
        except LoraError as exc:
            raise InvalidField("loras", problem(exc).message) from None
        name = lora_name(ref)
        if name in seen:
            raise InvalidField("loras", f"LoRA {name!r} is named twice ({seen[name]!r} and {ref!r})")
        seen[name] = ref
