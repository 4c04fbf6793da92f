"""A small preview of FLUX latents while they denoise: a linear latent-to-RGB projection, no VAE decode.

FLUX hands the step callback packed latents [B, (H/16)*(W/16), 64]: every token is a 2x2 patch of the
16-channel latent image, channel-major (index c*4 + dy*2 + dx, as diffusers' `_pack_latents` lays it
out). Each latent pixel maps to RGB through a 16x3 matrix plus a bias, fitted by ComfyUI against
FLUX.1's VAE (`comfy/latent_formats.py`, class `Flux`); the colours are rough, the layout is right.
The projection runs where the latents are (the GPU); only an (H/8)x(W/8)x3 uint8 array comes back.
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

# Rows: the 16 latent channels; columns: R, G, B. Applied to the latents as the transformer sees them.
FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
LATENT_CHANNELS = 16
PATCH = 2
PIXELS_PER_TOKEN = 16  # VAE factor 8 x patch 2


def latents_to_rgb(latents: torch.Tensor, width: int, height: int, index: int = 0) -> torch.Tensor:
    """Image `index` of packed latents [B, seq, 64] -> uint8 RGB [H/8, W/8, 3] on the CPU."""
    rows, cols = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    packed = latents[index]
    if packed.shape != (rows * cols, LATENT_CHANNELS * PATCH * PATCH):
        raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit a {width}x{height} image")
    factors = torch.tensor(FLUX_LATENT_RGB_FACTORS, dtype=torch.float32, device=packed.device)
    bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device=packed.device)
    patches = packed.float().reshape(rows, cols, LATENT_CHANNELS, PATCH, PATCH)
    # (row, col, channel, dy, dx) x (channel, rgb) -> (row, dy, col, dx, rgb): the latent image in RGB.
    rgb = torch.einsum("hwcyx,ck->hywxk", patches, factors) + bias
    rgb = rgb.reshape(rows * PATCH, cols * PATCH, 3)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()


def preview_image(latents: torch.Tensor, width: int, height: int, index: int = 0, max_side: int = 256):
    """The preview as a PIL image whose longest side is `max_side`, with the output's aspect ratio."""
    image = Image.fromarray(latents_to_rgb(latents, width, height, index).numpy(), "RGB")
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def preview_data_url(
    latents: torch.Tensor, width: int, height: int, index: int = 0, max_side: int = 256, quality: int = 75
) -> str:
    """`data:image/jpeg;base64,...` of the preview, for an SSE `preview` event."""
    buffer = io.BytesIO()
    preview_image(latents, width, height, index, max_side).save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
