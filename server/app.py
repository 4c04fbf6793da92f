"""`create_app(settings)`: the FastAPI app; loading the engine and running the worker."""

from __future__ import annotations

import asyncio
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
from server.codec import configure_pillow
from server.cors import install_cors
from server.errors import install_error_handlers
from server.jobs import JobQueue
from server.requestlog import RequestContext
from server.results import ResultStore
from server.routes import assets, generate, health, playground
from server.settings import Settings
from server.shutdown import drain

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def build_engine(settings: Settings) -> Engine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    source = model_source(settings.model, settings.tiny_dir)
    log.info("loading %s on %s as %s", source, device, dtype)
    pipe = load_flux_pipeline(source, device, dtype, offload=settings.offload, quantize=settings.quantize)
    # Before the optimizations: a compiled transformer gets its hot-swap LoRA slots before compiling.
    loras = LoraCache(
        pipe,
        LoraLibrary(settings.lora_dir),
        cache_size=settings.lora_cache_size,
        max_bytes=int(settings.max_lora_mb * 2**20),
        slots=settings.lora_slots if settings.optimize != "none" else 0,
        max_rank=settings.lora_max_rank,
    )
    applied = apply_optimizations(pipe, settings, device)
    return Engine(
        pipe,
        max_batch=settings.max_batch,
        loras=loras,
        prompt_cache_size=settings.prompt_cache_size,
        optimizations=applied,
    )


def warm_up(engine: Engine, settings: Settings, jobs: JobQueue) -> None:
    """Text-to-image at each `--warmup-sizes` size (compiling it), then img2img and inpaint once.

    The first user request of a warmed size pays no compile or first-call costs; any other size
    still works, compiling on its first request. The text-to-image timing seeds the throughput
    estimate behind Retry-After.
    """
    if not settings.warmup:
        return
    sizes = settings.warmup_size_list or [(512, 512)]
    base = dict(prompt="warm-up", steps=settings.warmup_steps, guidance=3.5, seeds=[1])
    for width, height in warmup_shapes(sizes):
        log.info("warming up %dx%d", width, height)
        spec = GenerationSpec(**base, width=width, height=height)
        result = engine.generate(spec)
    # Text-to-image runs every step, as the throughput estimate assumes (img2img runs strength x steps).
    jobs.observe(spec, result.seconds)
    width, height = sizes[0]
    image = Image.new("RGB", (width, height), (127, 127, 127))
    mask = Image.new("L", (width, height), 255)
    for extra in ({"init_image": image}, {"init_image": image, "mask_image": mask}):
        engine.generate(GenerationSpec(**base, width=width, height=height, **extra))


def _load_in_background(app: FastAPI, factory: EngineFactory) -> None:
    state = app.state
    try:
        engine = factory(state.settings)
        warm_up(engine, state.settings, state.jobs)
    except Exception as exc:  # readiness reports it; the process stays up to say why
        log.exception("model load failed")
        state.load_error = f"model load failed: {exc}"
        return
    state.engine = engine
    state.jobs.start(engine)
    if not state.draining.is_set():  # a SIGTERM during loading wins
        state.ready.set()
        log.info("ready")


async def _sweep_results(app: FastAPI, every: float = 60.0) -> None:
    """Expire async results even when nobody polls (the store also sweeps on every access)."""
    while True:
        await asyncio.sleep(every)
        app.state.results.sweep()


def create_app(settings: Settings, engine_factory: EngineFactory = build_engine) -> FastAPI:
    configure_pillow(settings.max_image_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load_in_background, args=(app, engine_factory), daemon=True)
        loader.start()
        sweeper = asyncio.ensure_future(_sweep_results(app))
        yield
        sweeper.cancel()
        # Under `octoflux serve` SIGTERM has drained already; this covers any other way of stopping.
        await asyncio.to_thread(drain, app)
        if app.state.async_tasks:
            await asyncio.wait(app.state.async_tasks, timeout=5)
        app.state.results.close()

    app = FastAPI(title="octoflux", summary="OctoAI-compatible FLUX.1-dev server", lifespan=lifespan)
    app.state.settings = settings
    app.state.ready = threading.Event()
    app.state.draining = threading.Event()
    app.state.load_error = None
    app.state.engine = None
    app.state.jobs = JobQueue(settings.max_queue)
    app.state.lora_library = LoraLibrary(settings.lora_dir)
    app.state.assets = AssetStore(app.state.lora_library, settings.lora_upload_ttl_s)
    app.state.results = ResultStore(
        ttl=settings.result_ttl, max_bytes=int(settings.max_result_mb * 2**20), spill_dir=settings.results_dir
    )
    app.state.async_tasks = set()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(assets.router)
    app.include_router(playground.router)
    app.add_middleware(
        BodySizeLimit, max_bytes=int(settings.max_body_mb * 2**20), exempt=assets.is_upload_path
    )
    # Outermost, so that even a 413 carries X-Request-ID and gets its log line.
    app.add_middleware(RequestContext)
    install_cors(app, settings)
    return app
