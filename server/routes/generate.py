"""`POST /generate/flux-dev`: validate, decode, queue, wait, encode."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pipelines.engine import GenerationCancelled, GenerationSpec
from pipelines.loras import LoraError, LoraLibrary, lora_name
from server.auth import require_bearer
from server.codec import ImageDecodeError, decode_image, encode_images, fit
from server.errors import ServiceUnavailable, invalid
from server.jobs import QueueFull
from server.schemas import (
    DEFAULT_GUIDANCE,
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_SEED,
    SUPPORTED_RESOLUTIONS,
    GenerateRequest,
    GenerateResponse,
    ImageGeneration,
    nearest_resolution,
    resolution_error,
)
from server.settings import Settings

router = APIRouter()
DISCONNECT_POLL_SECONDS = 0.25


def resolve_seeds(seed: int | list[int | None] | None, num_images: int) -> list[int]:
    """An int gives seed, seed+1, ...; a list gives one seed per image; gaps are drawn at random."""
    if isinstance(seed, int):
        return [(seed - 1 + i) % MAX_SEED + 1 for i in range(num_images)]
    if seed is None:
        seed = [None] * num_images
    if len(seed) != num_images:
        raise invalid("seed", f"seed list has {len(seed)} entries but num_images is {num_images}")
    return [s if s is not None else secrets.randbelow(MAX_SEED) + 1 for s in seed]


def resolve_size(req: GenerateRequest, init_aspect: float | None) -> tuple[int, int]:
    if req.width is not None and req.height is not None:
        size = (req.width, req.height)
    elif init_aspect is None:
        size = (req.width or DEFAULT_SIZE, req.height or DEFAULT_SIZE)
    else:
        size = nearest_resolution(init_aspect, req.width, req.height)
        if size is None:
            field = "width" if req.width is not None else "height"
            raise invalid(field, resolution_error(req.width, req.height))
    if size not in SUPPORTED_RESOLUTIONS:
        raise invalid(
            "width" if size[0] not in {w for w, _ in SUPPORTED_RESOLUTIONS} else "height",
            resolution_error(*size),
        )
    return size


def build_spec(req: GenerateRequest, settings: Settings) -> GenerationSpec:
    """Decode images and apply defaults; raises a 422 naming the field for anything unusable."""
    if req.mask_image is not None and req.init_image is None:
        raise invalid("mask_image", "mask_image needs init_image (inpainting edits an existing image)")
    limits = dict(max_bytes=int(settings.max_image_mb * 2**20), max_pixels=settings.max_image_pixels)
    try:
        init = decode_image(req.init_image, "init_image", **limits) if req.init_image is not None else None
        mask = decode_image(req.mask_image, "mask_image", **limits) if req.mask_image is not None else None
    except ImageDecodeError as exc:
        raise invalid(exc.field, str(exc)) from None
    if init is not None and mask is not None:
        init_aspect, mask_aspect = init.width / init.height, mask.width / mask.height
        if abs(init_aspect / mask_aspect - 1) > 0.01:
            raise invalid(
                "mask_image",
                f"mask_image is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
                "their aspect ratios must match",
            )
    width, height = resolve_size(req, init.width / init.height if init is not None else None)
    num_images = req.num_images or 1
    strength = req.strength or (DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_STRENGTH)
    return GenerationSpec(
        prompt=req.prompt,
        width=width,
        height=height,
        steps=req.steps or DEFAULT_STEPS,
        guidance=req.cfg_scale if req.cfg_scale is not None else DEFAULT_GUIDANCE,
        seeds=resolve_seeds(req.seed, num_images),
        init_image=fit(init, width, height) if init is not None else None,
        mask_image=fit(mask, width, height).convert("L") if mask is not None else None,
        strength=strength,
        loras={name: 1.0 if weight is None else weight for name, weight in (req.loras or {}).items()},
    )


def lora_invalid(exc: LoraError):
    """A 422 on `loras` whose message names the LoRA."""
    message = str(exc) if repr(exc.name) in str(exc) else f"LoRA {exc.name!r}: {exc}"
    return invalid("loras", message)


def check_loras(loras: dict[str, float], library: LoraLibrary | None) -> None:
    """A 422 naming the first LoRA that has no file (or a bad name, or is named twice)."""
    seen: dict[str, str] = {}
    for ref in loras:
        if library is None:
            raise invalid("loras", f"unknown LoRA {ref!r}: this server serves no LoRAs")
        try:
            library.resolve(ref)
        except LoraError as exc:
            raise lora_invalid(exc) from None
        name = lora_name(ref)
        if name in seen:
            raise invalid("loras", f"LoRA {name!r} is named twice ({seen[name]!r} and {ref!r})")
        seen[name] = ref


async def wait_for_job(request: Request, job) -> object:
    """Wait for the worker; a client that goes away cancels its job."""
    pending = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return pending.result()
        if await request.is_disconnected():
            job.cancel()
            raise GenerationCancelled("client disconnected")


@router.post(
    "/generate/flux-dev",
    response_model=GenerateResponse,
    dependencies=[Depends(require_bearer)],
    summary="Generate images with FLUX.1-dev (text-to-image, image-to-image, inpainting)",
)
async def generate_flux_dev(body: GenerateRequest, request: Request):
    state = request.app.state
    if not state.ready.is_set():
        raise ServiceUnavailable("model is still loading", retry_after=5)
    spec = await run_in_threadpool(build_spec, body, state.settings)
    check_loras(spec.loras, state.lora_library if getattr(state.engine, "loras", None) else None)
    try:
        job = state.jobs.submit(spec)
    except QueueFull as full:
        return JSONResponse(
            status_code=429,
            content={"detail": f"server busy: {state.jobs.depth} jobs queued"},
            headers={"Retry-After": str(full.retry_after)},
        )
    try:
        result = await wait_for_job(request, job)
    except GenerationCancelled:
        return JSONResponse(status_code=499, content={"detail": "request cancelled"})
    except LoraError as exc:  # deleted since the check above, or the file is unusable
        raise lora_invalid(exc) from None
    encoded = await run_in_threadpool(encode_images, result.images, body.image_encoding or "png")
    return GenerateResponse(
        images=[
            ImageGeneration(image_b64=b64, seed=seed) for b64, seed in zip(encoded, spec.seeds, strict=True)
        ],
        prediction_time_ms=result.seconds * 1000,
    )
