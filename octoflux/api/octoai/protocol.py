"""OctoAI's wire models: `POST /generate/flux-dev` (and flux-schnell) bodies, async answers; ranges as
OctoAI's API page gives them (the served model's sizes and defaults are the core's, `core/models.py`)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from octoflux.core.models import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LORA_WEIGHT,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    SUPPORTED_RESOLUTIONS,
)

__all__ = [
    "SUPPORTED_RESOLUTIONS",
    "AsyncAccepted",
    "AsyncStatus",
    "FillRequest",
    "GenerateRequest",
    "GenerateResponse",
    "KontextRequest",
]
# Pixels outpainting may add on one side.
MAX_OUTPAINT = 2048

# Fields the SDK can send that FLUX.1 does not support ("[Not supported on FLUX]" on OctoAI's page):
# a non-null value is a 422.
UNSUPPORTED_ON_FLUX = (
    "checkpoint", "clip_skip", "controlnet", "controlnet_conditioning_scale",
    "controlnet_early_stop", "controlnet_image", "controlnet_preprocess", "high_noise_frac",
    "inpaint_full_res", "inpaint_full_res_padding", "negative_prompt", "negative_prompt_2",
    "outpainting", "prompt_2", "sampler", "style_preset", "textual_inversions",
    "transfer_images", "use_refiner", "vae",
)  # fmt: skip

Seed = Annotated[StrictInt, Field(gt=0, le=MAX_SEED)]
StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class GenerateRequest(BaseModel):
    """The body of `POST /generate/flux-dev`; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, strict=True)]
    cfg_scale: Annotated[StrictFloat, Field(gt=0, le=MAX_GUIDANCE)] | None = None
    num_images: Annotated[StrictInt, Field(ge=1, le=MAX_IMAGES)] | None = None
    seed: Seed | list[Seed | None] | None = None
    steps: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)] | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    strength: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    init_image: Annotated[str, Field(strict=True)] | None = None
    mask_image: Annotated[str, Field(strict=True)] | None = None
    loras: dict[str, StrictFloat | None] | None = None
    image_encoding: Literal["png", "jpeg"] | None = None
    log_prompt: Annotated[bool, Field(strict=True)] | None = None

    checkpoint: Any = None
    clip_skip: Any = None
    controlnet: Any = None
    controlnet_conditioning_scale: Any = None
    controlnet_early_stop: Any = None
    controlnet_image: Any = None
    controlnet_preprocess: Any = None
    high_noise_frac: Any = None
    inpaint_full_res: Any = None
    inpaint_full_res_padding: Any = None
    negative_prompt: Any = None
    negative_prompt_2: Any = None
    outpainting: Any = None
    prompt_2: Any = None
    sampler: Any = None
    style_preset: Any = None
    textual_inversions: Any = None
    transfer_images: Any = None
    use_refiner: Any = None
    vae: Any = None

    @field_validator(*UNSUPPORTED_ON_FLUX)
    @classmethod
    def _not_on_flux(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("not supported on FLUX.1; omit it or send null")
        return None

    @field_validator("loras")
    @classmethod
    def _lora_weights_in_range(cls, loras: dict[str, float | None] | None) -> dict[str, float | None] | None:
        for name, weight in (loras or {}).items():
            if weight is not None and not (math.isfinite(weight) and abs(weight) <= MAX_LORA_WEIGHT):
                bound = f"{MAX_LORA_WEIGHT:g}"
                raise ValueError(f"weight of LoRA {name!r} must be within [-{bound}, {bound}]")
        return loras


ImageField = Annotated[str, Field(strict=True, description="base64 image (PNG, JPEG or WebP)")]


class KontextRequest(GenerateRequest):
    """The body of `POST /generate/flux-kontext-dev`: `init_image` edited as `prompt` says. Without `width`
    and `height` the output keeps the input's aspect at a Kontext training resolution; `cfg_scale`
    defaults to 2.5. `mask_image` and `strength` are refused (422 naming the field)."""

    init_image: ImageField


class Outpaint(BaseModel):
    """Pixels to add on each side of `init_image`; the result must be a supported size."""

    model_config = ConfigDict(extra="forbid")

    left: Annotated[StrictInt, Field(ge=0, le=MAX_OUTPAINT)] = 0
    right: Annotated[StrictInt, Field(ge=0, le=MAX_OUTPAINT)] = 0
    top: Annotated[StrictInt, Field(ge=0, le=MAX_OUTPAINT)] = 0
    bottom: Annotated[StrictInt, Field(ge=0, le=MAX_OUTPAINT)] = 0

    def sides(self) -> tuple[int, int, int, int]:
        return (self.left, self.right, self.top, self.bottom)


class FillRequest(GenerateRequest):
    """The body of `POST /generate/flux-fill-dev`: `init_image` with `mask_image` (white repaints), or
    with `outpaint` (pixels to add on each side); `cfg_scale` defaults to 30. Kept pixels come back as
    they were."""

    init_image: ImageField
    outpaint: Outpaint | None = None


class ImageGeneration(BaseModel):
    image_b64: str
    seed: int
    removed_for_safety: bool = False
    safety_score: float | None = None


class GenerateResponse(BaseModel):
    images: list[ImageGeneration]
    prediction_time_ms: float


class ErrorDetail(BaseModel):
    detail: str


class AsyncAccepted(BaseModel):
    """What `X-OctoAI-Async: 1` returns at once; the octoai SDK's `InferenceFuture`."""

    response_id: str
    poll_url: str


class AsyncStatus(BaseModel):
    response_id: str
    status: Literal["pending", "running", "completed", "failed", "cancelled"]
    created_at: float = Field(description="Unix time the job was accepted")
    error: str | None = Field(None, description="Why the job failed or was cancelled")
    response_url: str | None = Field(None, description="Where the result is, once completed")
