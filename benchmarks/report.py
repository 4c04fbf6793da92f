"""Benchmark output: results.json, results.md (tables) and results.png (chart)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(value, spec: str = ".3f", none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# octoflux benchmark: {meta['weights']} on {meta['device_name']}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['steps']} steps, {meta['warmup']} warm-up + {meta['runs']} timed runs per shape; "
        f"torch {meta['torch']}, diffusers {meta['diffusers']}; "
        f"MFU against {_fmt(meta['peak_tflops'], '.0f')} "
        "TFLOP/s dense bf16. FLOPs per step: see benchmarks/flops.py.",
        "",
        "## Pipeline level (Engine.generate)",
        "",
        "| mode | shape | s/image median | p90 | s/step | images/min | vs eager | steps computed "
        "| peak GPU GiB | MFU | transformer MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in results["modes"]:
        if mode.get("error"):
            lines.append(f"| {mode['mode']} | – | failed: {mode['error']} | | | | | | | | |")
            continue
        peak = mode["memory"]["peak_gpu_gb"]
        for row in mode["shapes"]:
            lines.append(
                f"| {mode['mode']} | {row['shape']} | {_fmt(row['median_s_per_image'])} "
                f"| {_fmt(row['p90_s_per_image'])} | {_fmt(row['s_per_step'], '.4f')} "
                f"| {_fmt(row['images_per_min'], '.1f')} | {_fmt(row.get('speedup'), '.2f')}x "
                f"| {_fmt(row['steps_computed'], '.1f')} | {_fmt(peak, '.1f')} | {_pct(row['mfu'])} "
                f"| {_pct(row['transformer_mfu'])} |"
            )
    lines += [
        "",
        "## Time to ready (build + warm-up of this run's shapes, img2img and inpaint)",
        "",
        "| mode | build s | warm-up s | time to ready s | graphs compiled |",
        "|---|---|---|---|---|",
    ]
    for mode in results["modes"]:
        if mode.get("error") or "time_to_ready_s" not in mode:
            continue
        lines.append(
            f"| {mode['mode']} | {_fmt(mode['build_s'], '.1f')} | {_fmt(mode['warmup_s'], '.1f')} "
            f"| {_fmt(mode['time_to_ready_s'], '.1f')} | {mode['warmup_compiles']} |"
        )
    lines += [
        "",
        "## Quality proxy (same weights and seed as eager)",
        "",
        "| mode | quality cost | shape | PSNR dB vs eager | final-latent rel. error |",
        "|---|---|---|---|---|",
    ]
    for mode in results["modes"]:
        quality = mode.get("quality") or {}
        lines.append(
            f"| {mode['mode']} | {mode.get('quality_cost', '')} | {quality.get('shape', '–')} "
            f"| {_fmt(quality.get('psnr_db'), '.2f')} | {_fmt(quality.get('latent_rel_error'), '.2e')} |"
        )
    lines += [
        "",
        "## Server level (HTTP, PNG, base64, JSON; same engine)",
        "",
        "| mode | shape | pipeline s | server s | overhead | PNG encode ms | concurrent wall / engine "
        "| concurrent images/min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in results["modes"]:
        server = mode.get("server")
        if not server:
            continue
        lines.append(
            f"| {mode['mode']} | {server['shape']} | {_fmt(server['pipeline_median_s'])} "
            f"| {_fmt(server['server_median_s'])} | {_pct(server['overhead'])} "
            f"| {_fmt(server.get('png_encode_ms'), '.1f')} "
            f"| {_fmt(server.get('concurrent_wall_over_engine'))} "
            f"| {_fmt(server.get('concurrent_images_per_min'), '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    """Seconds per image and speed-up over eager, one bar per mode for each shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in results["modes"] if not m.get("error")]
    shapes = list(dict.fromkeys(row["shape"] for m in modes for row in m["shapes"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        by_shape = {row["shape"]: row for row in mode["shapes"]}
        xs = [j + i * width for j in range(len(shapes))]
        left.bar(
            xs, [by_shape.get(s, {}).get("median_s_per_image", 0) for s in shapes], width, label=mode["mode"]
        )
        speedups = [by_shape.get(s, {}).get("speedup") or 0 for s in shapes]
        right.bar(xs, speedups, width, label=mode["mode"])
    for axis, title in ((left, "seconds per image (median)"), (right, "speed-up over eager")):
        axis.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(shapes))], shapes)
        axis.set_title(title)
        axis.legend()
    right.axhline(1.0, color="grey", linewidth=0.8)
    meta = results["meta"]
    fig.suptitle(f"octoflux, {meta['weights']} weights, {meta['steps']} steps, {meta['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "chart": out_dir / "results.png",
    }
    write_json(results, paths["json"])
    paths["markdown"].write_text(markdown(results))
    chart(results, paths["chart"])
    return paths
