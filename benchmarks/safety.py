"""Cost of the safety checker per image: CLIP preprocessing and the checker's forward pass.

    python -m benchmarks.safety                       # the tiny checker on the CPU
    python -m benchmarks.safety --full-size            # CompVis' architecture (CLIP ViT-L/14), random weights
    python -m benchmarks.safety --checker DIR --device cuda --dtype bfloat16

Images are random noise at each size, screened in batches as the engine does (one `check` call
per request). Prints one JSON object, then one summary line per size and batch.

Measured on a 2-core CPU shared with other work (OMP_NUM_THREADS=1, float32, median ms per image):
| checker | 512x512 b1 | 512x512 b4 | 1024x1024 b1 | 1024x1024 b4 |
|---|---|---|---|---|
| tiny (32px CLIP tower) | 8.1 | 6.8 | 20.5 | 20.6 |
| full-size (ViT-L/14, 224px) | 4213 | 4184 | 4427 | 3298 |
The tiny checker's cost is almost all CLIP preprocessing (the PIL resize of the decoded image):
about 9 ms at 512x512 and 21 ms at 1024x1024. The full-size checker's forward pass dominates on a
CPU; not measured on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from octoflux.pipelines.loader import resolve_device, resolve_dtype
from octoflux.pipelines.safety import SafetyChecker, write_tiny_safety_checker
from octoflux.settings import parse_sizes


def full_size_checker(device: torch.device, dtype: torch.dtype) -> SafetyChecker:
    """CompVis/stable-diffusion-safety-checker's architecture (its config.json) with random weights."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
        ),
        projection_dim=768,
    )
    model = StableDiffusionSafetyChecker(config).to(device, dtype).eval()
    return SafetyChecker(model, CLIPImageProcessor(), device, dtype)  # CLIP's defaults: 224px


def noise(width: int, height: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(checker: SafetyChecker, images: list[Image.Image], runs: int) -> dict:
    checker.check(images)  # first call: allocations, kernel selection
    total, preprocess = [], []
    for _ in range(runs):
        _sync(checker.device)
        started = time.perf_counter()
        checker.processor([im.convert("RGB") for im in images], return_tensors="pt")
        preprocess.append(time.perf_counter() - started)
        started = time.perf_counter()
        checker.check(images)
        _sync(checker.device)
        total.append(time.perf_counter() - started)
    per_image = statistics.median(total) / len(images)
    return {
        "ms_per_image": round(per_image * 1000, 2),
        "preprocess_ms_per_image": round(statistics.median(preprocess) / len(images) * 1000, 2),
        "batch_ms": round(statistics.median(total) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checker", help="checker folder (default: the tiny random-weight checker)")
    parser.add_argument("--full-size", action="store_true", help="CLIP ViT-L/14 checker, random weights")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sizes", default="512x512,1024x1024")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    name = args.checker or ("full-size" if args.full_size else "tiny")
    if args.full_size:
        checker = full_size_checker(device, dtype)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.checker or str(write_tiny_safety_checker(tmp))
            checker = SafetyChecker.load(folder, device, dtype)
    rows = []
    for width, height in parse_sizes(args.sizes):
        for batch in (int(b) for b in args.batches.split(",")):
            row = {"size": f"{width}x{height}", "batch": batch}
            row |= measure(checker, noise(width, height, batch), args.runs)
            rows.append(row)
    result = {
        "checker": name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(json.dumps(result))
    for row in rows:
        print(
            f"safety checker ({result['checker']}, {result['device']}): {row['size']} batch {row['batch']}: "
            f"{row['ms_per_image']} ms/image ({row['preprocess_ms_per_image']} ms preprocessing)"
        )
    return result


if __name__ == "__main__":
    main()
