"""`python -m benchmarks.warmup`: what each way of avoiding a compile on a user's request costs.

For each option a fresh engine is built and warmed as the server would before `/readyz`; then
every supported size gets two requests in a row. Reported per option: graphs compiled and time
to ready, first and second request per size (and the graphs the first one compiled), and the
per-step cost against static shapes at the same size.

Options:
  static-lazy   dynamic=False, only 512x512 warmed (each other size compiles on its first request)
  static-all    dynamic=False, every size x batch 1..--max-batch warmed
  dynamic       dynamic=True (image tokens and batch symbolic), only 512x512 warmed
  dynamic-all   dynamic=True, every size x batch warmed
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from octoflux.core.models import SUPPORTED_RESOLUTIONS
from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.loader import load_flux_pipeline, model_source, resolve_device, resolve_dtype
from octoflux.pipelines.optimize import apply_optimizations
from octoflux.pipelines.warmup import compile_count, warm_up
from octoflux.settings import Settings

log = logging.getLogger("benchmarks.warmup")

OPTIONS: dict[str, dict] = {
    "static-lazy": dict(dynamic=False, warm_all=False),
    "static-all": dict(dynamic=False, warm_all=True),
    "dynamic": dict(dynamic=True, warm_all=False),
    "dynamic-all": dict(dynamic=True, warm_all=True),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warmup", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="tiny", help="tiny, random-full or a diffusers folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--optimize", default="compile", choices=["compile", "fp8", "cache"])
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma list of {list(OPTIONS)}")
    parser.add_argument(
        "--sizes", default="all", help="'all' (the 14 supported sizes) or a comma list of WIDTHxHEIGHT"
    )
    parser.add_argument("--max-batch", type=int, default=2, help="batches 1..N are warmed and probed")
    parser.add_argument("--steps", type=int, default=2, help="steps per request (and per warm-up run)")
    parser.add_argument("--step-runs", type=int, default=3, help="timed runs for the per-step cost")
    parser.add_argument(
        "--step-sizes", default="512x512,1024x1024", help="sizes whose per-step cost is compared"
    )
    parser.add_argument("--step-steps", type=int, default=4, help="steps of each per-step run")
    parser.add_argument(
        "--cold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each option compiles into an empty inductor cache (no kernel reuse between options)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.option_list = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = [o for o in args.option_list if o not in OPTIONS]
    if unknown:
        parser.error(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    if args.sizes == "all":
        args.size_list = list(SUPPORTED_RESOLUTIONS)
    else:
        args.size_list = Settings(warmup_sizes=args.sizes).warmup_size_list
    args.step_size_list = Settings(warmup_sizes=args.step_sizes).warmup_size_list
    return args


def build(args: argparse.Namespace, dynamic: bool) -> Engine:
    settings = Settings(model=args.weights, device=args.device, optimize=args.optimize, warmup=False)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = load_flux_pipeline(model_source(settings.model, settings.tiny_dir), device, dtype)
    applied = apply_optimizations(pipe, settings, device, dynamic_shapes=dynamic)
    return Engine(pipe, max_batch=args.max_batch, optimizations=applied)


def spec(width: int, height: int, steps: int, batch: int = 1, prompt: str = "a red fox") -> GenerationSpec:
    seeds = list(range(11, 11 + batch))
    return GenerationSpec(prompt=prompt, width=width, height=height, steps=steps, guidance=3.5, seeds=seeds)


def timed(engine: Engine, job: GenerationSpec) -> tuple[float, int]:
    before, started = compile_count(), time.perf_counter()
    engine.generate(job)
    return (time.perf_counter() - started) * 1000, compile_count() - before


def run_option(args: argparse.Namespace, name: str) -> dict:
    option = OPTIONS[name]
    torch._dynamo.reset()
    cold_dir = tempfile.mkdtemp(prefix=f"inductor-{name}-") if args.cold else None
    if cold_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_dir
    started = time.perf_counter()
    engine = build(args, option["dynamic"])
    build_s = time.perf_counter() - started
    sizes = args.size_list if option["warm_all"] else [(512, 512)]
    batches = range(1, args.max_batch + 1) if option["warm_all"] else [1]
    report = warm_up(engine, sizes, batches, steps=args.steps, batches_at_every_size=not option["dynamic"])
    entry = dict(
        option=name,
        dynamic=option["dynamic"],
        warmed_sizes=len(report.sizes),
        warmed_batches=report.batches,
        build_s=build_s,
        warmup_s=report.seconds,
        time_to_ready_s=build_s + report.seconds,
        warmup_compiles=report.compiles,
        warmup_runs=[asdict(run) for run in report.runs],
    )
    probes = []
    for width, height in args.size_list:
        first_ms, compiles = timed(engine, spec(width, height, args.steps, prompt=f"first {width}"))
        second_ms, again = timed(engine, spec(width, height, args.steps, prompt=f"second {width}"))
        probes.append(
            dict(size=f"{width}x{height}", batch=1, first_ms=first_ms, second_ms=second_ms,
                 first_compiles=compiles, second_compiles=again)
        )  # fmt: skip
        log.info("%s %dx%d: first %.0f ms (%d compiles), second %.0f ms", name, width, height,
                 first_ms, compiles, second_ms)  # fmt: skip
    width, height = args.size_list[-1]
    for batch in range(2, args.max_batch + 1):
        first_ms, compiles = timed(engine, spec(width, height, args.steps, batch, prompt=f"b{batch} first"))
        second_ms, again = timed(engine, spec(width, height, args.steps, batch, prompt=f"b{batch} second"))
        probes.append(
            dict(size=f"{width}x{height}", batch=batch, first_ms=first_ms, second_ms=second_ms,
                 first_compiles=compiles, second_compiles=again)
        )  # fmt: skip
    entry["probes"] = probes
    entry["worst_first_over_second"] = max(p["first_ms"] / p["second_ms"] for p in probes)
    entry["request_compiles"] = sum(p["first_compiles"] + p["second_compiles"] for p in probes)
    per_step, step_compiles = {}, 0
    for width, height in args.step_size_list:
        timed(engine, spec(width, height, args.step_steps, prompt="step warm-up"))
        runs = [timed(engine, spec(width, height, args.step_steps, prompt=f"step {i}"))
                for i in range(args.step_runs)]  # fmt: skip
        per_step[f"{width}x{height}"] = statistics.median(ms for ms, _ in runs) / args.step_steps
        step_compiles += sum(compiles for _, compiles in runs)
    entry["ms_per_step"] = per_step
    entry["step_run_compiles"] = step_compiles  # 0: the per-step runs are compile-free
    del engine
    gc.collect()
    torch._dynamo.reset()
    if cold_dir is not None:
        shutil.rmtree(cold_dir, ignore_errors=True)
    return entry


def markdown(results: dict) -> str:
    options = results["options"]
    # Per-step ratios against static graphs that were all warmed (no recompiles in between).
    static = next((o for o in options if o["option"] == "static-all"), None)
    static = static or next((o for o in options if not o["dynamic"]), None)
    lines = [
        f"# Warm-up options: {results['meta']['weights']}, --optimize {results['meta']['optimize']}, "
        f"{results['meta']['device']}",
        "",
        f"`{results['meta']['command']}`",
        "",
        "| option | sizes x batches warmed | graphs compiled (warm-up) | time to ready s | graphs compiled "
        "by requests | worst first/second | ms/step "
        + " | ".join(results["options"][0]["ms_per_step"])
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(options[0]["ms_per_step"]),
    ]
    for o in options:
        steps = []
        for size, ms in o["ms_per_step"].items():
            ratio = f" ({ms / static['ms_per_step'][size]:.2f}x static)" if static and o["dynamic"] else ""
            steps.append(f"{ms:.1f}{ratio}")
        lines.append(
            f"| {o['option']} | {o['warmed_sizes']} x {len(o['warmed_batches'])} | {o['warmup_compiles']} "
            f"| {o['time_to_ready_s']:.1f} | {o['request_compiles']} | {o['worst_first_over_second']:.2f} "
            f"| {' | '.join(steps)} |"
        )
    lines += ["", "First / second request, ms (graphs compiled by the first):", ""]
    header = "| size | batch | " + " | ".join(o["option"] for o in options) + " |"
    lines += [header, "|---|---|" + "---|" * len(options)]
    for i, probe in enumerate(options[0]["probes"]):
        cells = []
        for o in options:
            p = o["probes"][i]
            cells.append(f"{p['first_ms']:.0f} / {p['second_ms']:.0f} ({p['first_compiles']})")
        lines.append(f"| {probe['size']} | {probe['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = resolve_device(args.device)
    results = dict(
        meta=dict(
            command="python -m benchmarks.warmup " + shlex.join(sys.argv[1:] if argv is None else argv),
            weights=args.weights,
            optimize=args.optimize,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            torch=torch.__version__,
            steps=args.steps,
            max_batch=args.max_batch,
        ),
        options=[],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.option_list:
        results["options"].append(run_option(args, name))
        (args.out / "warmup.json").write_text(json.dumps(results, indent=2))
        (args.out / "warmup.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
