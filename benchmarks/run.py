"""`make bench` / `python -m benchmarks.run`: speed modes side by side, pipeline and server level.

Each mode gets a fresh engine on the same weights (random weights come from a fixed seed), is
warmed (compiled) on every shape, then timed; results are ratios to eager bf16 ("none")
measured in the same run; each mode's time to ready (build plus the server's warm-up) and the
graphs compiled on the way are reported too. Results are rewritten after every mode, so a run cut short still
leaves its JSON, markdown and chart behind.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.flops import FluxShape, peak_tflops
from benchmarks.pipeline import (
    Shape,
    measure,
    peak_memory,
    psnr,
    reference_output,
    relative_error,
    reset_peak_memory,
)
from octoflux.pipelines.loader import ModelLoadError, resolve_device
from octoflux.pipelines.optimize import QUALITY_COST, OptimizationError, enable_step_cache
from octoflux.pipelines.warmup import warm_up
from octoflux.settings import Settings

log = logging.getLogger("benchmarks")

# Benchmark mode -> Settings overrides. "step-cache" is the cache alone (no fp8, no compile):
# it runs on a CPU and isolates the cache's share of the "cache" mode's speed-up.
MODES: dict[str, dict] = {
    "none": {},
    "compile": {"optimize": "compile"},
    "fp8": {"optimize": "fp8"},
    "cache": {"optimize": "cache"},
    "step-cache": {},
    "offload-model": {"offload": "model"},
    "offload-sequential": {"offload": "sequential"},
    "quantize-fp8": {"quantize": "fp8"},
    "quantize-int8": {"quantize": "int8"},
    "quantize-nf4": {"quantize": "nf4"},
}
GPU_MODES = "none,compile,fp8,cache"
CPU_MODES = "none,step-cache"
GPU_SHAPES = "1024x1024x1,1024x1024x4,512x512x1,1344x768x1"
CPU_SHAPES = "512x512x1,1024x1024x1"


def quality_cost(mode: str) -> str:
    overrides = MODES[mode]
    if mode == "step-cache":
        return "lossy: skips transformer steps whose first-block residual barely changes"
    for key in ("quantize", "offload"):
        if key in overrides:
            return QUALITY_COST[f"{key}={overrides[key]}"]
    return QUALITY_COST[overrides.get("optimize", "none")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        default="random-full" if cuda else "tiny",
        help="random-full (FLUX.1-dev architecture, random bf16 weights built on the GPU), tiny, or a DIR",
    )
    parser.add_argument(
        "--modes", default=GPU_MODES if cuda else CPU_MODES, help=f"comma list of {list(MODES)}"
    )
    parser.add_argument(
        "--shapes", default=GPU_SHAPES if cuda else CPU_SHAPES, help="comma list of WIDTHxHEIGHT[xBATCH]"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per shape (the first compiles)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per shape")
    parser.add_argument("--server", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--server-runs", type=int, default=None, help="timed HTTP requests (default --runs)")
    parser.add_argument("--cache-threshold", type=float, default=0.08)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument(
        "--peak-tflops", type=float, help="dense bf16 peak for MFU (default: from the GPU's name)"
    )
    parser.add_argument(
        "--budget-s", type=float, help="time budget: later shapes of a mode are skipped past its share"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    args.shape_list = [Shape.parse(s) for s in args.shapes.split(",") if s.strip()]
    return args


def settings_for(args: argparse.Namespace, mode: str) -> Settings:
    return Settings(
        model=args.weights,
        device=args.device,
        dtype=args.dtype,
        max_batch=max(shape.batch for shape in args.shape_list),
        cache_threshold=args.cache_threshold,
        attention_backend=args.attention_backend,
        warmup=False,
        **MODES[mode],
    )


def build(settings: Settings, mode: str):
    from octoflux.app import build_engine

    engine = build_engine(settings)
    if mode == "step-cache":
        engine.optimizations.step_counter = enable_step_cache(
            engine.pipe.transformer, settings.cache_threshold
        )
    return engine


def release(engine) -> None:
    """Free one mode's model before the next is built (two full FLUX copies do not fit)."""
    del engine
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_mode(
    args, mode: str, device: torch.device, peak: float | None, baseline: dict | None, deadline: float | None
) -> dict:
    """Build one mode's engine; measure the first shape, its quality and the server, then the rest.

    The first shape (the targets' 1024x1024 batch 1 by default) is always measured; later shapes
    are skipped once `deadline` (time.monotonic) has passed, so every mode gets its headline row.
    """
    entry = dict(mode=mode, quality_cost=quality_cost(mode), settings=MODES[mode], error=None)
    settings = settings_for(args, mode)
    started = time.perf_counter()
    try:
        engine = build(settings, mode)
    except (OptimizationError, ModelLoadError, ImportError, RuntimeError) as exc:
        log.error("mode %s could not be built: %s", mode, exc)
        entry["error"] = f"{type(exc).__name__}: {exc}"
        return entry
    entry["build_s"] = time.perf_counter() - started
    # What the server does before /readyz: every shape of this run, then img2img and inpaint.
    warmed = warm_up(
        engine,
        [(shape.width, shape.height) for shape in args.shape_list],
        [shape.batch for shape in args.shape_list],
        steps=2,
    )
    entry.update(
        warmup_s=warmed.seconds,
        time_to_ready_s=entry["build_s"] + warmed.seconds,
        warmup_compiles=warmed.compiles,
    )
    applied = engine.optimizations
    entry["applied"] = dict(
        optimize=applied.optimize,
        offload=applied.offload,
        attention_backend=applied.attention_backend,
        compiled=applied.compiled,
    )
    flux_shape = FluxShape.from_config(engine.pipe.transformer.config)
    reset_peak_memory(device)
    entry["shapes"], entry["skipped_shapes"] = [], []
    for index, shape in enumerate(args.shape_list):
        if index and deadline is not None and time.monotonic() > deadline:
            entry["skipped_shapes"].append(shape.label)
            continue
        log.info("%s: %s, %d steps", mode, shape.label, args.steps)
        measured = measure(engine, shape, args.steps, args.warmup, args.runs, device, applied.step_counter)
        entry["shapes"].append(with_speedup(measured.summary(flux_shape, peak), mode, baseline))
        if index == 0:
            entry.update(quality_and_server(args, engine, settings, entry, baseline))
    entry["memory"] = peak_memory(device)
    release(engine)
    return entry


def with_speedup(row: dict, mode: str, baseline: dict | None) -> dict:
    if mode == "none":
        row["speedup"] = 1.0
    elif baseline is not None:
        base = next((r for r in baseline["shapes"] if r["shape"] == row["shape"]), None)
        row["speedup"] = base["median_s_per_image"] / row["median_s_per_image"] if base else None
    return row


def quality_and_server(args, engine, settings: Settings, entry: dict, baseline: dict | None) -> dict:
    """The quality proxy against eager at the first size, and the HTTP measurements at the first shape."""
    from benchmarks.server import encode_cost, measure_overlap, measure_server, serve

    found: dict = {}
    probe = args.shape_list[0]
    single = Shape(probe.width, probe.height, 1)
    pixels, latents = reference_output(engine, single, args.steps)
    found["_reference"] = (pixels, latents)
    if baseline is not None and baseline.get("_reference") is not None:
        ref_pixels, ref_latents = baseline["_reference"]
        found["quality"] = dict(
            shape=single.label,
            psnr_db=psnr(pixels, ref_pixels),
            latent_rel_error=relative_error(latents, ref_latents),
        )
    if not args.server:
        return found
    server_runs = args.server_runs or args.runs
    pipe_median = entry["shapes"][0]["median_s_per_image"] * probe.batch
    with serve(engine, settings) as url:
        server = measure_server(url, probe, args.steps, warmup=1, runs=server_runs)
        server.update(measure_overlap(url, probe, args.steps, requests=2 * server_runs))
    server.update(encode_cost(engine, probe, args.steps))
    server.update(
        shape=probe.label, pipeline_median_s=pipe_median, overhead=server["server_median_s"] / pipe_median - 1
    )
    found["server"] = server
    return found


def public(results: dict) -> dict:
    """Results without the in-memory reference tensors."""
    modes = [{k: v for k, v in m.items() if not k.startswith("_")} for m in results["modes"]]
    return {**results, "modes": modes}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import diffusers

    device = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or (peak_tflops(device_name) if device.type == "cuda" else None)
    results = dict(
        meta=dict(
            command="python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv),
            weights=args.weights,
            device=str(device),
            device_name=device_name,
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            steps=args.steps,
            warmup=args.warmup,
            runs=args.runs,
            peak_tflops=peak,
            started=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
        modes=[],
    )
    baseline = None
    started = time.monotonic()
    for index, mode in enumerate(args.mode_list):
        deadline = None
        if args.budget_s:  # an equal share of what is left for each remaining mode
            left = args.budget_s - (time.monotonic() - started)
            deadline = time.monotonic() + left / (len(args.mode_list) - index)
        entry = run_mode(args, mode, device, peak, baseline, deadline)
        if mode == "none" and not entry["error"]:
            baseline = entry
        results["modes"].append(entry)
        paths = report.write_all(public(results), args.out)
    results["meta"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    paths = report.write_all(public(results), args.out)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return public(results)


if __name__ == "__main__":
    main()
