"""Warm-up before `/readyz` turns 200: the first user request pays no compile or first-call cost."""

from __future__ import annotations

import logging

from PIL import Image

from pipelines.engine import Engine, GenerationSpec
from pipelines.optimize import warmup_shapes
from server.jobs import JobQueue
from server.settings import Settings

log = logging.getLogger(__name__)


def warm_up(engine: Engine, settings: Settings, jobs: JobQueue) -> None:
    """Text-to-image at each `--warmup-sizes` size (compiling it), then img2img and inpaint once.

    The text-to-image timing seeds the throughput estimate behind Retry-After.
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
    if not engine.family_info.image_inputs:  # schnell serves text-to-image only
        return
    width, height = sizes[0]
    image = Image.new("RGB", (width, height), (127, 127, 127))
    mask = Image.new("L", (width, height), 255)
    for extra in ({"init_image": image}, {"init_image": image, "mask_image": mask}):
        engine.generate(GenerationSpec(**base, width=width, height=height, **extra))
