"""OpenAI Images API requests and responses (`/v1/images/*`, `/v1/models`), with FLUX's rules.

The fields mean what OpenAI's API reference says; `size` is limited to FLUX's 14 resolutions. Fields
with no FLUX meaning that clients send by default are accepted and ignored (`IGNORED_FIELDS`); any
other unknown field is a 400, as OpenAI answers. `seed`, `steps` and `guidance` (and `strength` on
edits) are our extensions, with the OctoAI route's ranges.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from octoflux.core.models import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    SUPPORTED_RESOLUTIONS,
)

SIZES: dict[str, tuple[int, int]] = {f"{w}x{h}": (w, h) for w, h in SUPPORTED_RESOLUTIONS}
AUTO = "auto"
IGNORED_FIELDS = (
    "quality", "style", "user", "background", "moderation", "output_compression",
    "safety_identifier", "input_fidelity",
)  # fmt: skip
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

Finite = Annotated[float, Field(allow_inf_nan=False)]


def _not_streamed(stream: bool | None) -> bool | None:
    if stream:
        raise ValueError("streaming is not offered; send false or leave it out")
    return stream


# A bool, so that a multipart form's "false" is read as JSON's false is.
NoStream = Annotated[
    bool | None,
    AfterValidator(_not_streamed),
    Field(description="streaming is not offered; false or omitted"),
]


def size_error(size: str) -> str:
    listed = ", ".join(SIZES)
    return f"{size!r} is not a supported size; use one of: {listed}, or auto"


class ImageOptions(BaseModel):
    """What generations and edits share."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = Field(
        None, description="a served model id (`GET /v1/models`); omitted: the one served"
    )
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] | None = Field(
        None, description="images to generate (default 1)"
    )
    size: str | None = Field(
        None,
        description="WIDTHxHEIGHT, one of FLUX's 14 resolutions, or `auto`: 1024x1024 for generations, "
        "the supported size nearest the image's aspect ratio for edits",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="`b64_json` (default) or `url`: a link valid for --result-ttl, no key needed"
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="default png")

    seed: Annotated[int, Field(gt=0, le=MAX_SEED)] | None = Field(
        None, description="extension: image i gets seed+i (default: drawn at random)"
    )
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None, description="extension: denoising steps (default: the model's, 30 dev, 4 schnell)"
    )
    guidance: Annotated[Finite, Field(gt=0, le=MAX_GUIDANCE)] | None = Field(
        None, description="extension: FLUX.1-dev's distilled guidance (cfg_scale), default 3.5"
    )

    # Accepted and ignored: no FLUX meaning.
    quality: Any = None
    style: Any = None
    user: Any = None
    background: Any = None
    moderation: Any = None
    output_compression: Any = None
    safety_identifier: Any = None
    input_fidelity: Any = None

    @field_validator("size")
    @classmethod
    def _supported_size(cls, size: str | None) -> str | None:
        if size is None or size == AUTO or size in SIZES:
            return size
        raise ValueError(size_error(size))

    @property
    def encoding(self) -> str:
        return self.output_format or "png"


class ImageGenerateRequest(ImageOptions):
    """The JSON body of `POST /v1/images/generations`."""

    stream: NoStream = None


class ImageEditForm(ImageOptions):
    """The multipart form of `POST /v1/images/edits`."""

    image: list[UploadFile] | None = Field(None, description="the image to edit (PNG, JPEG or WebP)")
    image_array: list[UploadFile] | None = Field(
        None, alias="image[]", description="what newer clients send instead of `image`; one image"
    )
    mask: UploadFile | None = Field(
        None,
        description="PNG with an alpha channel, the image's size: fully transparent pixels are "
        "edited (inpainting), the rest kept; without a mask the edit is image-to-image",
    )
    strength: Annotated[Finite, Field(gt=0, le=1)] | None = Field(
        None, description="extension: how much to change, 0.8 without a mask and 1.0 with one by default"
    )
    stream: NoStream = None

    def images(self) -> list[UploadFile]:
        return [*(self.image or []), *(self.image_array or [])]


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int = Field(description="extension: the seed of this image")
    removed_for_safety: bool = Field(
        False, description="extension: flagged by --safety-checker (the image is black)"
    )
    safety_score: float | None = Field(
        None, description="extension: the checker's highest concept score; null without --safety-checker"
    )


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody
