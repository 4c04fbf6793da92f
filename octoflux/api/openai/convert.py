"""OpenAI's request as the core's `ImageRequest`, and the core's result as OpenAI's `data` items."""

from __future__ import annotations

import base64

from PIL import Image

from octoflux.api.openai.protocol import AUTO, SIZES, ImageData, ImageOptions
from octoflux.core.codec import encode_images
from octoflux.core.generation import Generated
from octoflux.core.request import ImageRequest


def image_request(
    options: ImageOptions,
    init: Image.Image | None = None,
    mask: Image.Image | None = None,
    strength: float | None = None,
) -> ImageRequest:
    """No size means the default (or, with an image, the supported size nearest its aspect)."""
    width, height = SIZES.get(options.size or AUTO, (None, None))
    return ImageRequest(
        prompt=options.prompt,
        num_images=options.n or 1,
        seed=options.seed,
        steps=options.steps,
        guidance=options.guidance,
        width=width,
        height=height,
        init_image=init,
        mask_image=mask,
        strength=strength,
    )


def encoded(generated: Generated, encoding: str) -> list[bytes]:
    """Each image as a file in `encoding` (CPU work: call it off the event loop)."""
    return encode_images([item.image for item in generated.images], encoding)


def image_data(generated: Generated, contents: list[dict[str, str]]) -> list[ImageData]:
    """OpenAI's `data`: each image's content (`b64_json` or `url`) with our seed and safety extensions."""
    return [
        ImageData(
            **content,
            seed=item.seed,
            removed_for_safety=item.removed_for_safety,
            safety_score=item.safety_score,
        )
        for content, item in zip(contents, generated.images, strict=True)
    ]


def b64(files: list[bytes]) -> list[dict[str, str]]:
    return [{"b64_json": base64.b64encode(data).decode("ascii")} for data in files]
