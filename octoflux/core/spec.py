"""An `ImageRequest` becomes a `GenerationSpec`: the served model's defaults, sizes, seeds, fitted images.

Pure functions, no HTTP and no model: each raises `InvalidField` naming the core's field it cannot use.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from PIL import Image

from octoflux.core.codec import ImageDecodeError, decode_image, fit
from octoflux.core.errors import InvalidField, problem
from octoflux.core.models import (
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_SIZE,
    DEFAULT_STRENGTH,
    KONTEXT_RESOLUTIONS,
    MAX_SEED,
    check_image_inputs,
    nearest_resolution,
    resolution_error,
    resolutions,
)
from octoflux.core.outpaint import outpaint_canvas
from octoflux.core.request import ImageRequest
from octoflux.pipelines.engine import GenerationSpec
from octoflux.pipelines.family import FLUX_KONTEXT_DEV, INPAINT, Family
from octoflux.pipelines.loras import LoraError, LoraLibrary, lora_name

ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int

    def decode(self, value: str, field: str) -> Image.Image:
        """A base64 image (data-URL prefix allowed) within these limits; `InvalidField` naming `field`."""
        try:
            return decode_image(value, field, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            raise InvalidField(exc.field, str(exc)) from None


def resolve_seeds(seed: int | list[int | None] | None, num_images: int) -> list[int]:
    """An int gives seed, seed+1, ... wrapping past 2^32-1 to 1; a list gives one seed per image;
    gaps are drawn at random."""
    if isinstance(seed, int):
        return [(seed - 1 + i) % MAX_SEED + 1 for i in range(num_images)]
    if seed is None:
        seed = [None] * num_images
    if len(seed) != num_images:
        raise InvalidField("seed", f"seed list has {len(seed)} entries but num_images is {num_images}")
    return [s if s is not None else secrets.randbelow(MAX_SEED) + 1 for s in seed]


def resolve_size(
    width: int | None, height: int | None, init_aspect: float | None, family: Family | None = None
) -> tuple[int, int]:
    """The requested size, the default, or (with an init image) the supported size nearest its aspect;
    on Kontext, without a size, the Kontext training resolution nearest it (as diffusers picks)."""
    supported = resolutions(family)
    if width is not None and height is not None:
        size = (width, height)
    elif init_aspect is None:
        size = (width or DEFAULT_SIZE, height or DEFAULT_SIZE)
    elif family is not None and family.model_id == FLUX_KONTEXT_DEV and width is None and height is None:
        size = min(KONTEXT_RESOLUTIONS, key=lambda wh: abs(init_aspect - wh[0] / wh[1]))
    else:
        size = nearest_resolution(init_aspect, width, height)
        if size is None:
            raise InvalidField(
                "width" if width is not None else "height", resolution_error(width, height, family)
            )
    if size not in supported:
        bad_width = size[0] not in {w for w, _ in supported}
        raise InvalidField("width" if bad_width else "height", resolution_error(*size, family))
    return size


def check_same_aspect(init: Image.Image, mask: Image.Image, field: str = "mask_image") -> None:
    if abs((init.width / init.height) / (mask.width / mask.height) - 1) > ASPECT_TOLERANCE:
        raise InvalidField(
            field,
            f"{field} is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
            "their aspect ratios must match",
        )


def build_spec(request: ImageRequest, family: Family) -> GenerationSpec:
    """The model's defaults applied; `InvalidField` for anything the model cannot use."""
    check_image_inputs(family, request)
    init, mask = request.init_image, request.mask_image
    if mask is not None and init is None:
        raise InvalidField("mask_image", "mask_image needs init_image (inpainting edits an existing image)")
    if family.modes == (INPAINT,) and mask is None and request.outpaint is None:
        raise InvalidField("mask_image", f"{family.model_id} needs mask_image (white repaints) or outpaint")
    if request.outpaint is not None:
        if mask is not None:
            raise InvalidField("outpaint", "send mask_image (inpaint) or outpaint, not both")
        init, mask = outpaint_canvas(init, request.outpaint, family)
        if (request.width, request.height) != (None, None) and (request.width, request.height) != init.size:
            raise InvalidField(
                "width" if request.width is not None else "height",
                f"an outpainted image is {init.width}x{init.height} (init_image plus outpaint); "
                "omit width and "
                "height or give that size",
            )
    if init is not None and mask is not None:
        check_same_aspect(init, mask)
    aspect = init.width / init.height if init is not None else None
    if request.outpaint is not None:
        width, height = init.size  # a supported size: outpaint_canvas checked it
    else:
        width, height = resolve_size(request.width, request.height, aspect, family)
    strength = request.strength or (DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_STRENGTH)
    # Kontext reads the picture at its own training resolution (the pipeline resizes it); the others
    # take it at the output size.
    fitted = family.model_id != FLUX_KONTEXT_DEV
    return GenerationSpec(
        prompt=request.prompt,
        width=width,
        height=height,
        steps=request.steps or family.default_steps,
        guidance=request.guidance if request.guidance is not None else family.default_guidance,
        seeds=resolve_seeds(request.seed, request.num_images),
        init_image=(fit(init, width, height) if fitted else init) if init is not None else None,
        mask_image=fit(mask, width, height).convert("L") if mask is not None else None,
        strength=strength,
        loras=dict(request.loras),
        model=family.model_id,
    )


def check_loras(
    loras: dict[str, float], library: LoraLibrary | None, space: str | None = None
) -> dict[str, float]:
    """The LoRAs as the keys the engine loads (the caller's own in `space` first, then shared ones);
    `InvalidField` on `loras` naming the first LoRA without a file, with a bad name, or named twice."""
    seen: dict[str, str] = {}
    resolved: dict[str, float] = {}
    for ref, weight in loras.items():
        if library is None:
            raise InvalidField("loras", f"unknown LoRA {ref!r}: this server serves no LoRAs")
        try:
            key = library.resolve_key(ref, space)
        except LoraError as exc:
            raise InvalidField("loras", problem(exc).message) from None
        name = lora_name(ref)
        if name in seen:
            raise InvalidField("loras", f"LoRA {name!r} is named twice ({seen[name]!r} and {ref!r})")
        seen[name] = ref
        resolved[key] = weight
    return resolved
