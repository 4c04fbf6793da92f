"""The FLUX.1 family on one server: seconds per step per model, and the memory sharing saves.

    python -m benchmarks.family sharing                       # FLUX.1's real sizes (meta device)
    python -m benchmarks.family run --out DIR                 # tiny family on the CPU: JSON + summary
    python -m benchmarks.family run --model flux-dev=/m/FLUX.1-dev,flux-kontext-dev=/m/FLUX.1-Kontext-dev,\
flux-fill-dev=/m/FLUX.1-Fill-dev --size 1024 --steps 28 --out DIR      # the same on a GPU

`sharing` counts FLUX.1's text encoders and VAE from their real shapes (nothing allocated) and reports
what each model beyond the first would add without sharing. `run` loads the models as the server does
(`build_engine`), runs each on the same shape (Kontext and Fill with a picture, Fill with a half mask)
and reports the median seconds per denoising step, plus the distinct tensor bytes held against what
separate copies would hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "vae")
GB = 1e9


def sharing() -> dict:
    """Bytes (bf16) of FLUX.1's shared components, and what 2, 3 and 4 models save by sharing them."""
    from octoflux.pipelines.random_full import build_components

    components = build_components("meta", torch.float32)
    per_component = {
        name: sum(p.numel() for p in components[name].parameters()) * 2
        for name in (*SHARED_COMPONENTS, "transformer")
    }
    shared = sum(per_component[name] for name in SHARED_COMPONENTS)
    return {
        "bf16_bytes": per_component,
        "saved_bytes_by_models": {n: (n - 1) * shared for n in (2, 3, 4)},
        "set_bytes_by_models": {n: n * per_component["transformer"] + shared for n in (1, 2, 3, 4)},
    }


def run(model: str, size: int, steps: int, repeats: int, device: str, tiny_dir: Path | None) -> dict:
    from octoflux.core.engine_factory import build_models
    from octoflux.core.request import ImageRequest
    from octoflux.core.spec import build_spec
    from octoflux.pipelines.model_set import distinct_tensor_bytes as storage_bytes
    from octoflux.settings import Settings

    overrides = {"tiny_dir": tiny_dir} if tiny_dir is not None else {}
    started = time.perf_counter()
    models = build_models(Settings(model=model, device=device, **overrides))
    load_seconds = time.perf_counter() - started
    picture = Image.effect_mandelbrot((size, size), (-2, -1.5, 1, 1.5), 64).convert("RGB")
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    results = {}
    for model_id, engine in models.engines.items():
        images = {}
        if engine.family_info.needs_image:
            images = {"init_image": picture} | (
                {"mask_image": mask} if "inpaint" in engine.family_info.modes else {}
            )
        request = ImageRequest(prompt="a red car", width=size, height=size, steps=steps, seed=1, **images)
        spec = build_spec(request, engine.family_info)
        engine.generate(spec)  # warm
        seconds = [engine.generate(spec).seconds for _ in range(repeats)]
        results[model_id] = {"seconds_per_step": statistics.median(seconds) / steps, "runs": seconds}
    components = ("transformer", *SHARED_COMPONENTS)
    pipes = [engine.pipe for engine in models.engines.values()]
    held = storage_bytes([getattr(pipe, c) for pipe in pipes for c in components])
    copies = sum(storage_bytes([getattr(pipe, c) for c in components]) for pipe in pipes)
    return {
        "model": model,
        "device": device,
        "size": size,
        "steps": steps,
        "load_seconds": load_seconds,
        "models": results,
        "tensor_bytes_held": held,
        "tensor_bytes_as_separate_copies": copies,
        "shared_with": models.shared_with,
    }


def summary_lines(measured: dict | None, sizes: dict) -> list[str]:
    lines = ["# FLUX.1 family on one server", ""]
    if measured is not None:
        lines += [
            f"`{measured['model']}` on {measured['device']}, {measured['size']}x{measured['size']}, "
            f"{measured['steps']} steps; loaded in {measured['load_seconds']:.1f} s",
            "",
            "| model | s per step (request time / steps, median) |",
            "|---|---|",
        ]
        lines += [f"| {m} | {r['seconds_per_step']:.3f} |" for m, r in measured["models"].items()]
        held, copies = measured["tensor_bytes_held"], measured["tensor_bytes_as_separate_copies"]
        lines += [
            "",
            f"Tensors held: {held / 2**20:.1f} MiB; as separate copies: {copies / 2**20:.1f} MiB",
            "",
        ]
    bf16 = sizes["bf16_bytes"]
    lines += [
        "FLUX.1's real sizes (bf16): "
        + ", ".join(f"{name} {size / GB:.2f} GB" for name, size in bf16.items()),
        "",
        "| models served | weights with sharing | saved by sharing |",
        "|---|---|---|",
    ]
    for n, total in sizes["set_bytes_by_models"].items():
        saved = sizes["saved_bytes_by_models"].get(n, 0)
        lines.append(f"| {n} | {total / GB:.1f} GB | {saved / GB:.1f} GB |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.family", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sharing", help="print what sharing saves at FLUX.1's real sizes")
    measure = sub.add_parser("run", help="load a model set and time each model")
    measure.add_argument("--model", default="tiny-family")
    measure.add_argument("--device", default="auto")
    measure.add_argument("--size", type=int, default=512)
    measure.add_argument("--steps", type=int, default=4)
    measure.add_argument("--repeats", type=int, default=3)
    measure.add_argument("--tiny-dir", type=Path, default=None)
    measure.add_argument("--out", type=Path, default=Path("bench-results/family"))
    args = parser.parse_args(argv)
    sizes = sharing()
    if args.command == "sharing":
        print("\n".join(summary_lines(None, sizes)))
        return
    measured = run(args.model, args.size, args.steps, args.repeats, args.device, args.tiny_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "family.json").write_text(json.dumps({"measured": measured, "flux1_sizes": sizes}, indent=2))
    text = "\n".join(summary_lines(measured, sizes)) + "\n"
    (args.out / "family.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
