"""Outpainting as inpainting: the init image on a larger canvas, the added border as the mask.

FLUX.1-Fill-dev repaints where the mask is white and keeps the rest, so adding pixels on each side is
inpainting a canvas whose border is new. The canvas must be a size the model renders.
"""

from __future__ import annotations

from PIL import Image

from octoflux.core.errors import InvalidField
from octoflux.core.models import resolution_error, resolutions
from octoflux.pipelines.family import Family

# What the new border holds before it is repainted; the Fill pipeline masks it out, so any colour works.
BORDER_FILL = (127, 127, 127)


def outpaint_canvas(
    init: Image.Image, sides: tuple[int, int, int, int], family: Family
) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) for adding (left, right, top, bottom) pixels; `InvalidField` on `outpaint` when the
    result is not a supported size or nothing is added."""
    left, right, top, bottom = sides
    if min(sides) < 0:
        raise InvalidField("outpaint", "outpaint adds pixels: left, right, top and bottom must be 0 or more")
    if not any(sides):
        raise InvalidField("outpaint", "outpaint adds nothing: give left, right, top or bottom above 0")
    width, height = init.width + left + right, init.height + top + bottom
    if (width, height) not in resolutions(family):
        raise InvalidField(
            "outpaint",
            f"init_image {init.width}x{init.height} outpainted by {left}+{right} x {top}+{bottom} is "
            + resolution_error(width, height, family),
        )
    canvas = Image.new("RGB", (width, height), BORDER_FILL)
    canvas.paste(init.convert("RGB"), (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + init.width, top + init.height))
    return canvas, mask
