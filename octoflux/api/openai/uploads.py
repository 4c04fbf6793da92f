"""OpenAI's uploads as the engine's inputs: the image decoded as the OctoAI route decodes it, and the mask
turned from OpenAI's polarity (fully transparent = edit) into the engine's (white = repaint, black = keep).

Pure functions; each raises `InvalidField` naming `image` or `mask`.
"""

from __future__ import annotations

import base64
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from octoflux.core.codec import ImageDecodeError, decode_image
from octoflux.core.errors import InvalidField
from octoflux.core.spec import ImageLimits

MASK_FORMATS = ("PNG", "WEBP")  # formats that carry an alpha channel
REPAINT, KEEP = 255, 0


def read_image(raw: bytes, limits: ImageLimits) -> Image.Image:
    """The uploaded image as upright RGB, with the OctoAI route's limits on bytes, pixels and formats."""
    if len(raw) > limits.max_bytes:
        raise InvalidField("image", f"image is larger than the {limits.max_bytes / 2**20:g} MB limit")
    # The codec decodes the OctoAI route's base64; encoding a few MB for it costs milliseconds.
    encoded = base64.b64encode(raw).decode("ascii")
    try:
        return decode_image(encoded, "image", max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    except ImageDecodeError as exc:
        raise InvalidField("image", str(exc)) from None


def read_mask(raw: bytes, limits: ImageLimits, image_size: tuple[int, int]) -> Image.Image:
    """The engine's mask ("L": 255 repaints, 0 keeps) from OpenAI's: alpha 0 is edited, anything else kept."""
    mask = _open_mask(raw, limits)
    if mask.size != image_size:
        raise InvalidField(
            "mask",
            f"mask is {mask.width}x{mask.height} but image is {image_size[0]}x{image_size[1]}: "
            "they must be the same size",
        )
    has_alpha = mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info
    if not has_alpha:
        raise InvalidField(
            "mask",
            "mask has no alpha channel: send a PNG whose fully transparent pixels mark the area to edit",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: REPAINT if a == 0 else KEEP)


def _open_mask(raw: bytes, limits: ImageLimits) -> Image.Image:
    if not raw:
        raise InvalidField("mask", "empty mask")
    if len(raw) > limits.max_bytes:
        raise InvalidField("mask", f"mask is larger than the {limits.max_bytes / 2**20:g} MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            mask = Image.open(io.BytesIO(raw), formats=MASK_FORMATS)
            if mask.width * mask.height > limits.max_pixels:
                raise InvalidField(
                    "mask", f"{mask.width}x{mask.height} exceeds the {limits.max_pixels} pixel limit"
                )
            mask.load()
            return ImageOps.exif_transpose(mask)
    except InvalidField:
        raise
    except UnidentifiedImageError:
        raise InvalidField("mask", "not a PNG or WebP image (the mask needs an alpha channel)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidField("mask", f"mask exceeds the {limits.max_pixels} pixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidField("mask", f"corrupt or truncated mask ({exc})") from None
