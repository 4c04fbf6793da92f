"""Base64 ⇄ image, with limits on bytes, pixels and formats, and PNG/JPEG encoding.

PNG output goes through `fpng` when it is importable (lossless, about 15x faster than Pillow's
zlib at compress_level=1 on a 1024x1024 image; see docs/performance.md), else through Pillow.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

try:
    import fpng as _fpng
except ImportError:  # an optional speed-up; Pillow writes the same pixels
    _fpng = None

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
DATA_URL = re.compile(r"^data:([a-zA-Z0-9.+/-]*)((?:;[a-zA-Z0-9=.+-]+)*),", re.ASCII)
# PNG text chunks (iTXt/zTXt can be zlib bombs of their own): Pillow's defaults, stated here.
PNG_MAX_TEXT_CHUNK = 1 * 2**20
PNG_MAX_TEXT_MEMORY = 8 * 2**20
# Pillow fallback: compress_level=1 costs ~20% less CPU than Pillow's default 6 for ~4% larger files.
PNG_COMPRESS_LEVEL = 1
PNG_ENCODER = "fpng" if _fpng is not None else "pillow"
JPEG_QUALITY = 90
WEBP_QUALITY = 90

_encode_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode")


class ImageDecodeError(ValueError):
    """A request image could not be used; `field` names the request field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def configure_pillow(max_pixels: int) -> None:
    """Pillow's process-wide decoding limits, set explicitly rather than trusted as defaults."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # larger: DecompressionBombWarning, 2x larger: Error
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey bottom half
    PngImagePlugin.MAX_TEXT_CHUNK = PNG_MAX_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_MAX_TEXT_MEMORY


def strip_data_url(value: str, field: str) -> str:
    """`data:image/png;base64,AAAA` → `AAAA`; other data URLs are named in the error."""
    match = DATA_URL.match(value)
    if match is None:
        return value
    mime, params = match.group(1), match.group(2).split(";")
    if "base64" not in params:
        raise ImageDecodeError(field, "data URL is not base64-encoded; use data:image/png;base64,...")
    if mime and not mime.startswith("image/"):
        raise ImageDecodeError(field, f"data URL has media type {mime!r}; send an image")
    return value[match.end() :]


def decode_base64(value: str, field: str, max_bytes: int) -> bytes:
    payload = "".join(strip_data_url(value.strip(), field).split())  # line-wrapped base64 is fine
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageDecodeError(field, f"image is larger than the {max_bytes / 2**20:g} MB limit")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(field, "not valid base64 (standard alphabet, with = padding)") from None
    if not raw:
        raise ImageDecodeError(field, "empty image")
    return raw


def decode_image(value: str, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode a base64 (optionally data-URL) PNG/JPEG/WebP into an upright RGB image."""
    raw = decode_base64(value, field, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(field, f"{width}x{height} exceeds the {max_pixels} pixel limit")
            image.load()
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(field, "not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard fires while opening, before the size check above can run.
        raise ImageDecodeError(field, f"image exceeds the {max_pixels} pixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(field, f"corrupt or truncated image ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGBA/LA/P (composited on white), CMYK, L, I;16 and friends → 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height and centre-crop: no distortion, no borders."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image, encoder: str = PNG_ENCODER) -> bytes:
    """A lossless PNG of an RGB/RGBA image (other modes go through Pillow)."""
    if encoder == "fpng" and _fpng is not None and image.mode in ("RGB", "RGBA"):
        return _fpng.from_ndarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def webp_bytes(image: Image.Image) -> bytes:
    """Lossy, as OpenAI's webp output is."""
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=WEBP_QUALITY)
    return buffer.getvalue()


ENCODERS = {"png": png_bytes, "jpeg": jpeg_bytes, "webp": webp_bytes}


def encode_image(image: Image.Image, encoding: str) -> bytes:
    """The image as a file in `encoding` ("png", "jpeg" or "webp")."""
    return ENCODERS[encoding](image)


def encode_images(images: list[Image.Image], encoding: str) -> list[bytes]:
    """Encode in parallel: fpng, Pillow's zlib and libjpeg release the GIL."""
    return list(_encode_pool.map(lambda image: encode_image(image, encoding), images))
