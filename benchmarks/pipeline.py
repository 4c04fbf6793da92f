"""Pipeline-level measurement: `Engine.generate` timed alone, as the server's worker calls it."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.flops import FluxShape, mfu, transformer_flops_per_step
from octoflux.pipelines.engine import Engine, GenerationSpec

PROMPT = "a red fox in a snowy birch forest at dawn"  # short: the tiny CLIP has byte tokens
QUALITY_SEED = 42


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height} b{self.batch}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'1024x1024x4' (width x height x batch) or '1024x1024' (batch 1)."""
        parts = [int(v) for v in text.lower().split("x")]
        if len(parts) == 2:
            parts.append(1)
        if len(parts) != 3:
            raise ValueError(f"shape {text!r} is not WIDTHxHEIGHT[xBATCH]")
        return cls(*parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TransformerTimer:
    """Time spent inside the transformer's forward: CUDA events (no syncs mid-run) or wall clock."""

    def __init__(self, transformer, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self._handles = [
            transformer.register_forward_pre_hook(lambda *_: self._mark(start=True)),
            transformer.register_forward_hook(lambda *_: self._mark(start=False)),
        ]

    def _mark(self, start: bool) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        if start:
            self.spans.append((event, None))
        else:
            self.spans[-1] = (self.spans[-1][0], event)

    def reset(self) -> None:
        self.spans.clear()

    def seconds(self) -> float:
        """Total forward time since the last reset (synchronises the device)."""
        done = [(a, b) for a, b in self.spans if b is not None]
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in done) / 1000
        return sum(b - a for a, b in done)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class FinalLatents:
    """Keeps the scheduler's last output of a run: the final (packed) latents before VAE decoding."""

    def __init__(self, scheduler):
        self._scheduler = scheduler
        self._step = scheduler.step
        self.latents: torch.Tensor | None = None

        def step(*args, **kwargs):
            out = self._step(*args, **kwargs)
            self.latents = out[0] if isinstance(out, tuple) else out.prev_sample
            return out

        scheduler.step = step

    def remove(self) -> None:
        self._scheduler.step = self._step


@dataclass
class Measurement:
    shape: Shape
    steps: int
    seconds: list[float] = field(default_factory=list)
    transformer_seconds: list[float] = field(default_factory=list)
    first_call_seconds: float | None = None
    steps_computed: float | None = None

    def summary(self, flux_shape: FluxShape, peak_tflops: float | None) -> dict:
        per_run = statistics.median(self.seconds)
        p90 = float(np.percentile(self.seconds, 90))
        per_image = per_run / self.shape.batch
        steps_done = self.steps_computed if self.steps_computed is not None else self.steps
        flops = transformer_flops_per_step(self.shape.width, self.shape.height, self.shape.batch, flux_shape)
        run_flops = flops * steps_done
        transformer_s = statistics.median(self.transformer_seconds) if self.transformer_seconds else None
        return dict(
            shape=self.shape.label,
            width=self.shape.width,
            height=self.shape.height,
            batch=self.shape.batch,
            steps=self.steps,
            steps_computed=steps_done,
            runs=len(self.seconds),
            first_call_s=self.first_call_seconds,
            median_s_per_image=per_image,
            p90_s_per_image=p90 / self.shape.batch,
            s_per_step=per_run / self.steps,
            images_per_min=60.0 / per_image,
            transformer_s_per_run=transformer_s,
            tflop_per_step=flops / 1e12,
            mfu=mfu(run_flops, per_run, peak_tflops),
            transformer_mfu=mfu(run_flops, transformer_s, peak_tflops) if transformer_s else None,
            all_seconds=self.seconds,
        )


def spec_for(shape: Shape, steps: int, prompt: str, seed: int) -> GenerationSpec:
    seeds = [seed + i for i in range(shape.batch)]
    return GenerationSpec(
        prompt=prompt, width=shape.width, height=shape.height, steps=steps, guidance=3.5, seeds=seeds
    )


def measure(
    engine: Engine,
    shape: Shape,
    steps: int,
    warmup: int,
    runs: int,
    device: torch.device,
    counter=None,
    prompt: str = PROMPT,
) -> Measurement:
    """`warmup` untimed runs (the first one timed as first-call cost: compilation), then `runs` timed.

    Every run has a new prompt, so the text encoders run each time as they do for real traffic
    (the prompt cache only helps repeated prompts).
    """
    result = Measurement(shape=shape, steps=steps)
    timer = TransformerTimer(engine.pipe.transformer, device)
    try:
        for i in range(warmup):
            started = time.perf_counter()
            engine.generate(spec_for(shape, steps, f"{prompt} (warm-up {i})", seed=1))
            if i == 0:
                result.first_call_seconds = time.perf_counter() - started
        if counter is not None:
            counter.reset()
        for i in range(runs):
            timer.reset()
            synchronize(device)
            started = time.perf_counter()
            engine.generate(spec_for(shape, steps, f"{prompt} (run {i})", seed=1000 + i))
            result.seconds.append(time.perf_counter() - started)
            result.transformer_seconds.append(timer.seconds())
        if counter is not None and runs:
            result.steps_computed = counter.computed / runs
    finally:
        timer.remove()
    return result


def reference_output(engine: Engine, shape: Shape, steps: int) -> tuple[np.ndarray, torch.Tensor]:
    """Decoded pixels (uint8, NHWC) and final latents of one fixed-seed run, for the quality proxy."""
    capture = FinalLatents(engine.pipe.scheduler)
    try:
        result = engine.generate(spec_for(shape, steps, PROMPT, seed=QUALITY_SEED))
    finally:
        capture.remove()
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in result.images])
    return pixels, capture.latents.float().cpu()


def psnr(pixels: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images (inf when identical)."""
    mse = float(np.mean((pixels.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - x_ref|| / ||x_ref|| over the whole tensor."""
    return float((latents - reference).norm() / reference.norm().clamp_min(1e-12))


def peak_memory(device: torch.device) -> dict:
    """Peak GPU memory since the last reset, or None on a CPU (the host's peak RSS is given instead)."""
    import resource

    host_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if device.type != "cuda":
        return dict(peak_gpu_gb=None, peak_gpu_reserved_gb=None, host_peak_rss_gb=host_peak_gb)
    return dict(
        peak_gpu_gb=torch.cuda.max_memory_allocated(device) / 2**30,
        peak_gpu_reserved_gb=torch.cuda.max_memory_reserved(device) / 2**30,
        host_peak_rss_gb=host_peak_gb,
    )


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
