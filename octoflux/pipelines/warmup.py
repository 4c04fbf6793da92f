"""Warm-up before `/readyz`: every shape a request may bring is compiled before a user pays for it.

`warm_up` generates text-to-image at each size (largest first, so the allocator reserves its peak
once) and batch size, then one img2img and one inpaint run (their first-call costs: the VAE
encoder, the mask path). It reports what it warmed, how long it took, how many graphs dynamo
compiled on the way, and one text-to-image timing that compiled nothing, which the server uses
to seed its throughput estimate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from PIL import Image

from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.family import EDIT, IMG2IMG, INPAINT, TEXT2IMG

log = logging.getLogger(__name__)

WARMUP_PROMPT = "warm-up"
WARMUP_GUIDANCE = 3.5


def compile_count() -> int:
    """Graphs dynamo has compiled in this process (every backend, every recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warmup_order(sizes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sizes without duplicates, largest first."""
    return sorted(dict.fromkeys(sizes), key=lambda wh: wh[0] * wh[1], reverse=True)


@dataclass(frozen=True)
class WarmupRun:
    width: int
    height: int
    batch: int
    mode: str
    seconds: float
    compiles: int  # graphs compiled during this run


@dataclass
class WarmupReport:
    """What `warm_up` did; `throughput_spec`/`throughput_seconds` seed the server's estimate."""

    sizes: list[tuple[int, int]] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    runs: list[WarmupRun] = field(default_factory=list)
    seconds: float = 0.0
    compiles: int = 0
    throughput_spec: GenerationSpec | None = None
    throughput_seconds: float | None = None

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(run.mode for run in self.runs))

    def summary(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for w, h in self.sizes)
        return (
            f"warmed {len(self.sizes)} sizes ({sizes}) at batches {self.batches}, "
            f"modes {'/'.join(self.modes)}: {self.seconds:.1f} s, {self.compiles} graphs compiled"
        )


def warm_up(
    engine: Engine,
    sizes: Iterable[tuple[int, int]],
    batches: Iterable[int] = (1,),
    steps: int = 2,
    *,
    batches_at_every_size: bool | None = None,
    image_modes: bool = True,
    modes: tuple[str, ...] | None = None,
    on_run: Callable[[WarmupRun], None] | None = None,
) -> WarmupReport:
    """Text-to-image at every size (batch 1), then every batch size, then img2img and inpaint once.

    `modes` are the model's (default: text-to-image, plus img2img and inpaint with `image_modes`); a model
    without text-to-image (Kontext, Fill) warms its first mode at every size instead.

    Batch sizes above 1 run at the largest size only when the compiled blocks take dynamic
    shapes (one graph then serves every size at that batch), at every size otherwise
    (`batches_at_every_size`, default: not `octoflux.pipelines.optimize.DYNAMIC_SHAPES`). So a warmed
    shape's first request costs what its second does; a shape not warmed still works, and
    compiles on its first request if it needs a new graph.
    """
    if batches_at_every_size is None:
        from octoflux.pipelines.optimize import DYNAMIC_SHAPES

        batches_at_every_size = not DYNAMIC_SHAPES
    report = WarmupReport(sizes=warmup_order(sizes), batches=sorted(set(batches) | {1}))
    if not report.sizes:
        return report
    started, compiled_before = time.perf_counter(), compile_count()

    def run(spec: GenerationSpec) -> WarmupRun:
        before, t0 = compile_count(), time.perf_counter()
        result = engine.generate(spec)
        done = WarmupRun(
            spec.width, spec.height, len(spec.seeds), spec.mode, result.seconds, compile_count() - before
        )
        log.debug(
            "warm-up %s %dx%d batch %d: %.2f s, %d graphs compiled",
            done.mode, done.width, done.height, done.batch, time.perf_counter() - t0, done.compiles,
        )  # fmt: skip
        report.runs.append(done)
        if on_run is not None:
            on_run(done)
        return done

    if modes is None:
        modes = (TEXT2IMG, IMG2IMG, INPAINT) if image_modes else (TEXT2IMG,)
    first, *others = modes
    base = dict(prompt=WARMUP_PROMPT, steps=steps, guidance=WARMUP_GUIDANCE)
    last_clean: GenerationSpec | None = None
    for index, (width, height) in enumerate(report.sizes):
        for batch in report.batches:
            if batch > 1 and index > 0 and not batches_at_every_size:
                continue
            seeds = list(range(1, batch + 1))
            spec = GenerationSpec(
                **base, width=width, height=height, seeds=seeds, **_images(first, width, height)
            )
            done = run(spec)
            if batch == 1 and done.compiles == 0:
                last_clean, report.throughput_seconds = spec, done.seconds
    if last_clean is None:
        # Every size compiled on its run: time one more at the smallest, now warm.
        width, height = report.sizes[-1]
        last_clean = GenerationSpec(
            **base, width=width, height=height, seeds=[1], **_images(first, width, height)
        )
        report.throughput_seconds = run(last_clean).seconds
    report.throughput_spec = last_clean
    for mode in others:
        width, height = report.sizes[0]
        run(GenerationSpec(**base, width=width, height=height, seeds=[1], **_images(mode, width, height)))
    report.seconds = time.perf_counter() - started
    report.compiles = compile_count() - compiled_before
    log.info("%s", report.summary())
    return report


def _images(mode: str, width: int, height: int) -> dict:
    """The image inputs of a warm-up spec in `mode` (a Kontext edit is an init image without a mask)."""
    if mode == TEXT2IMG:
        return {}
    image = Image.new("RGB", (width, height), (127, 127, 127))
    if mode in (IMG2IMG, EDIT):
        return {"init_image": image}
    return {"init_image": image, "mask_image": Image.new("L", (width, height), 255)}
