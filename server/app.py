"""`create_app(settings)`: the FastAPI app; loading the engine and running the worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from PIL import Image

from pipelines.engine import Engine, GenerationSpec
from pipelines.loader import load_flux_pipeline, model_source, resolve_device, resolve_dtype
from pipelines.loras import LoraCache, LoraLibrary
from pipelines.optimize import apply_optimizations, warmup_shapes
from server.asset_store import AssetStore
from server.body_limit import BodySizeLimit
from server.errors import install_error_handlers
from server.jobs import JobQueue
from server.routes import assets, generate, health
from server.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def build_engine(settings: Settings) -> Engine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    source = model_source(settings.model, settings.tiny_dir)
    log.info("loading %s on %s as %s", source, device, dtype)
    pipe = load_flux_pipeline(source, device, dtype, offload=settings.offload, quantize=settings.quantize)
    applied = apply_optimizations(pipe, settings, device)
    loras = LoraCache(
        pipe,
        LoraLibrary(settings.lora_dir),
        cache_size=settings.lora_cache_size,
        max_bytes=int(settings.max_lora_mb * 2**20),
    )
    engine = Engine(
        pipe, max_batch=settings.max_batch, loras=loras, prompt_cache_size=settings.prompt_cache_size
    )
    engine.optimizations = applied
    return engine


def warm_up(engine: Engine, settings: Settings) -> None:
    """Text-to-image at each `--warmup-sizes` size (compiling it), then img2img and inpaint once.

    The first user request of a warmed size pays no compile or first-call costs; any other size
    still works, compiling on its first request.
    """
    if not settings.warmup:
        return
    sizes = settings.warmup_size_list or [(512, 512)]
    base = dict(prompt="warm-up", steps=settings.warmup_steps, guidance=3.5, seeds=[1])
    for width, height in warmup_shapes(sizes):
        log.info("warming up %dx%d", width, height)
        engine.generate(GenerationSpec(**base, width=width, height=height))
    width, height = sizes[0]
    image = Image.new("RGB", (width, height), (127, 127, 127))
    mask = Image.new("L", (width, height), 255)
    for extra in ({"init_image": image}, {"init_image": image, "mask_image": mask}):
        engine.generate(GenerationSpec(**base, width=width, height=height, **extra))


def _load_in_background(app: FastAPI, factory: EngineFactory) -> None:
    state = app.state
    try:
        engine = factory(state.settings)
        warm_up(engine, state.settings)
    except Exception as exc:  # readiness reports it; the process stays up to say why
        log.exception("model load failed")
        state.load_error = f"model load failed: {exc}"
        return
    state.engine = engine
    state.jobs.start(engine)
    state.ready.set()
    log.info("ready")


def create_app(settings: Settings, engine_factory: EngineFactory = build_engine) -> FastAPI:
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load_in_background, args=(app, engine_factory), daemon=True)
        loader.start()
        yield
        app.state.ready.clear()
        app.state.jobs.stop()

    app = FastAPI(title="octoflux", summary="OctoAI-compatible FLUX.1-dev server", lifespan=lifespan)
    app.state.settings = settings
    app.state.ready = threading.Event()
    app.state.load_error = None
    app.state.engine = None
    app.state.jobs = JobQueue(settings.max_queue)
    app.state.lora_library = LoraLibrary(settings.lora_dir)
    app.state.assets = AssetStore(app.state.lora_library, settings.lora_upload_ttl_s)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(assets.router)
    app.add_middleware(
        BodySizeLimit, max_bytes=int(settings.max_body_mb * 2**20), exempt=assets.is_upload_path
    )
    return app
