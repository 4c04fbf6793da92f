"""OctoAI's wire request as the core's `ImageRequest`, and the core's result as OctoAI's body."""

from __future__ import annotations

import base64

from octoflux.api.octoai.protocol import GenerateRequest, GenerateResponse, ImageGeneration
from octoflux.core.codec import encode_images
from octoflux.core.generation import Generated
from octoflux.core.request import ImageRequest
from octoflux.core.spec import ImageLimits


def image_request(body: GenerateRequest, limits: ImageLimits) -> ImageRequest:
    """Decodes the base64 images (CPU work: call it off the event loop); `InvalidField` naming them."""
    init = limits.decode(body.init_image, "init_image") if body.init_image is not None else None
    mask = limits.decode(body.mask_image, "mask_image") if body.mask_image is not None else None
    return ImageRequest(
        prompt=body.prompt,
        num_images=body.num_images or 1,
        seed=body.seed,
        steps=body.steps,
        guidance=body.cfg_scale,
        width=body.width,
        height=body.height,
        init_image=init,
        mask_image=mask,
        strength=body.strength,
        loras={name: 1.0 if weight is None else weight for name, weight in (body.loras or {}).items()},
        outpaint=outpaint.sides() if (outpaint := getattr(body, "outpaint", None)) is not None else None,
    )


def response(generated: Generated, encoding: str) -> GenerateResponse:
    encoded = encode_images([item.image for item in generated.images], encoding)
    images = [
        ImageGeneration(
            image_b64=base64.b64encode(data).decode("ascii"),
            seed=item.seed,
            removed_for_safety=item.removed_for_safety,
            safety_score=item.safety_score,
        )
        for data, item in zip(encoded, generated.images, strict=True)
    ]
    return GenerateResponse(images=images, prediction_time_ms=generated.seconds * 1000)


def response_body(generated: Generated, encoding: str) -> bytes:
    """The JSON body, serialized once (no second validation, no json.dumps on the event loop)."""
    return response(generated, encoding).model_dump_json().encode()
