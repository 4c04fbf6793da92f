"""Inpainting post-processing: keep every pixel the mask did not ask to repaint."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

MASK_THRESHOLD = 128
FEATHER_RADIUS = 2.0


def binarize_mask(mask: Image.Image) -> Image.Image:
    """White (>= 128) repaints, black keeps: the rule the pipeline's own mask processor applies."""
    return mask.convert("L").point(lambda v: 255 if v >= MASK_THRESHOLD else 0)


def composite_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Paste the original back wherever the mask is black, feathered only inside the white area.

    The VAE round trip alters every pixel slightly; without this, a user editing a small region
    would get a subtly different image everywhere else.
    """
    hard = np.asarray(binarize_mask(mask), dtype=np.float32) / 255.0
    blurred = (
        np.asarray(binarize_mask(mask).filter(ImageFilter.GaussianBlur(FEATHER_RADIUS)), dtype=np.float32)
        / 255.0
    )
    alpha = np.minimum(hard, blurred)[..., None]
    new = np.asarray(generated.convert("RGB"), dtype=np.float32)
    old = np.asarray(original.convert("RGB"), dtype=np.float32)
    mixed = np.where(alpha > 0, np.rint(alpha * new + (1.0 - alpha) * old), old)
    return Image.fromarray(mixed.astype(np.uint8))
