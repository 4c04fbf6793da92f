"""OpenAI's Images API on the same service as the OctoAI routes: `POST /v1/images/generations`,
`POST /v1/images/edits`, `GET /v1/models`, and the keyless links of `response_format: "url"`.

A thin dialect: requests become the core's `ImageRequest` (`convert.py`) and go through the same
`generation.prepare`/`generate` as every dialect (queue, limits, seeds, safety); only shapes differ.
Errors are rendered by `OpenAIRoute` (octoflux/api/openai/errors.py).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from octoflux.api.common.auth import require_bearer
from octoflux.api.common.deps import Service, absolute_url, caller, log_spec
from octoflux.api.common.owners import asset_space
from octoflux.api.openai import convert
from octoflux.api.openai.errors import OpenAIRoute
from octoflux.api.openai.protocol import (
    MEDIA_TYPES,
    ImageEditForm,
    ImageGenerateRequest,
    ImageOptions,
    ImagesResponse,
    ModelCard,
    ModelList,
    OpenAIError,
)
from octoflux.api.openai.uploads import read_image, read_mask
from octoflux.core.errors import InvalidField, NotFound
from octoflux.core.request import ImageRequest
from octoflux.core.service import GenerationService
from octoflux.pipelines.family import FLUX_DEV, FLUX_FILL_DEV, FLUX_KONTEXT_DEV, FLUX_SCHNELL, Family

router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI Images API"])


class ModelNotFound(NotFound):
    kind = "model_not_found"  # OpenAI's code for an unknown model id


AUTHORIZED = [Depends(require_bearer)]
OWNED_BY = "octoflux"
STARTED = int(time.time())  # `created` of the served model: when this process started serving it
ERRORS: dict = {
    status: {"model": OpenAIError, "description": text}
    for status, text in {
        400: "A bad value; `param` names it",
        401: "Missing or invalid bearer token",
        429: "Queue full; retry after `Retry-After` seconds",
        503: "Loading or shutting down",
    }.items()
}


@router.get("/v1/models", dependencies=AUTHORIZED, response_model=ModelList, responses=ERRORS)
async def list_models(service: Service) -> ModelList:
    """The models this server serves (flux-dev, flux-schnell, flux-kontext-dev, flux-fill-dev); empty while
    that is not known yet."""
    families = service.runtime.families or {}
    return ModelList(
        data=[ModelCard(id=model_id, created=STARTED, owned_by=OWNED_BY) for model_id in families]
    )


@router.get(
    "/v1/models/{model}",
    dependencies=AUTHORIZED,
    response_model=ModelCard,
    responses={**ERRORS, 404: {"model": OpenAIError, "description": "Not the served model"}},
)
async def retrieve_model(model: str, service: Service) -> ModelCard:
    """A served model's card (OpenAI's models.retrieve); 404 for any other id."""
    if model not in (service.runtime.families or {}):
        raise ModelNotFound(f"The model '{model}' does not exist")
    return ModelCard(id=model, created=STARTED, owned_by=OWNED_BY)


@router.post(
    "/v1/images/generations",
    dependencies=AUTHORIZED,
    response_model=ImagesResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
    summary="Create images from a prompt (OpenAI's images.generate)",
)
async def create_images(body: ImageGenerateRequest, request: Request, service: Service):
    family = _chosen_model(service, body.model, GENERATE_PREFERENCE)
    return await _generate(body, convert.image_request(body), request, service, family)


@router.post(
    "/v1/images/edits",
    dependencies=AUTHORIZED,
    response_model=ImagesResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
    summary="Edit an image (OpenAI's images.edit): Kontext (no mask) or Fill (a mask) when served, else "
    "FLUX.1-dev's image-to-image or inpainting",
)
async def edit_images(form: Annotated[ImageEditForm, Form()], request: Request, service: Service):
    preference = EDIT_WITH_MASK_PREFERENCE if form.mask is not None else EDIT_PREFERENCE
    family = _chosen_model(service, form.model, preference)
    if not family.image_inputs:
        raise InvalidField("image", f"{family.model_id} is text-to-image only: use /v1/images/generations")
    init, mask = await _read_uploads(form, service)
    image_request = convert.image_request(form, init, mask, form.strength)
    return await _generate(form, image_request, request, service, family)


@router.get(
    "/v1/images/results/{token}",
    name="image_link",
    response_class=Response,
    responses={
        200: {"content": {m: {} for m in MEDIA_TYPES.values()}},
        404: {"model": OpenAIError, "description": "Wrong or expired link"},
    },
    summary="A generated image behind an unguessable link (`response_format: url`); no key needed",
)
async def image_link(token: str, service: Service) -> Response:
    image, media_type = await service.links.image(token)
    return Response(image, media_type=media_type, headers={"Cache-Control": "private, no-transform"})


# Without `model`, the first of these served (else the first model served); docs/openai.md.
GENERATE_PREFERENCE = (FLUX_DEV, FLUX_SCHNELL)
EDIT_PREFERENCE = (FLUX_KONTEXT_DEV, FLUX_DEV)
EDIT_WITH_MASK_PREFERENCE = (FLUX_FILL_DEV, FLUX_DEV)


def _chosen_model(service: GenerationService, model: str | None, preference: tuple[str, ...]) -> Family:
    """`model` if served (a 400 listing the served ones otherwise); without it, by `preference`."""
    served = service.runtime.served_families()
    if model is not None:
        if model not in served:
            raise InvalidField("model", f"unknown model {model!r}; this server serves: {', '.join(served)}")
        return served[model]
    for model_id in preference:
        if model_id in served:
            return served[model_id]
    return next(iter(served.values()))


async def _read_uploads(
    form: ImageEditForm, service: GenerationService
) -> tuple[Image.Image, Image.Image | None]:
    images = form.images()
    if len(images) != 1:
        raise InvalidField("image", f"send exactly one image to edit (got {len(images)})")
    image = await run_in_threadpool(read_image, await images[0].read(), service.limits)
    if form.mask is None:
        return image, None
    mask = await run_in_threadpool(read_mask, await form.mask.read(), service.limits, image.size)
    return image, mask


async def _generate(
    options: ImageOptions,
    image_request: ImageRequest,
    request: Request,
    service: GenerationService,
    family: Family,
) -> ImagesResponse:
    fields: dict = request.state.log
    who = caller(request, api="openai")
    try:
        spec = await service.generation.prepare(image_request, family=family, space=asset_space(request))
        log_spec(fields, spec, with_prompt=False)
        encoding = options.encoding
        files, generated = await service.generation.generate(
            spec, who, lambda generated: (convert.encoded(generated, encoding), generated)
        )
    finally:
        fields.update(api=who.api, **who.trace.fields())
    if options.response_format == "url":
        tokens = await service.links.publish(files, MEDIA_TYPES[encoding])
        contents = [{"url": absolute_url(request, "image_link", token=token)} for token in tokens]
    else:
        contents = convert.b64(files)
    return ImagesResponse(
        created=int(time.time()),
        data=convert.image_data(generated, contents),
        output_format=encoding,
        size=f"{spec.width}x{spec.height}",
    )
