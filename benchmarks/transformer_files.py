"""Transformer files (`--transformer`): what fits which GPU, and load time, size and speed per file type.

    python -m benchmarks.transformer_files table            # the docs/performance.md table (estimator)
    python -m benchmarks.transformer_files cpu --out DIR    # tiny model on the CPU: JSON + summary

`table` sizes FLUX.1-dev from its real shapes (meta device, nothing allocated) with the transformer
stored as each file type would store it and the rest in bf16, then asks the startup estimator which
offload mode (none, then model, then group) fits each GPU size. `cpu` exports the tiny model's
transformer in each type, loads it beside the tiny folder and times it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GPU_SIZES_GB = (12, 16, 24, 48, 80)
TABLE_TYPES = ("bf16", "fp8", "gguf:Q8_0", "gguf:Q5_K", "gguf:Q4_K", "gguf:Q4_0")
CPU_TYPES = ("folder", "bf16", "fp8", "gguf:BF16", "gguf:Q8_0", "gguf:Q4_0")
OFFLOADS = ("none", "model", "group")
HOST_RAM_GB = 64  # assumed host RAM for offloaded weights


def least_offload(file_format: str, gpu_gb: int) -> str | None:
    from octoflux.pipelines.memory import GIB, WillNotFit, check_fits, count_flux_dev_with_file, estimate

    weights = count_flux_dev_with_file(file_format)
    for offload in OFFLOADS:
        need = estimate(weights, torch.bfloat16, offload=offload)
        try:
            check_fits(
                need, torch.device("cuda"), torch.bfloat16, "none", offload, gpu_gb * GIB, HOST_RAM_GB * GIB
            )
        except WillNotFit:
            continue
        return offload
    return None


def table() -> str:
    from octoflux.pipelines.memory import GIB, count_flux_dev_with_file, estimate

    gpus = " | ".join(f"{g} GB" for g in GPU_SIZES_GB)
    head = f"| transformer file | weights (transformer + T5, CLIP, VAE) | {gpus} |"
    rows = [head, "|---|---|" + "---|" * len(GPU_SIZES_GB)]
    for file_format in TABLE_TYPES:
        need = estimate(count_flux_dev_with_file(file_format), torch.bfloat16)
        transformer = need.components["transformer"]
        sizes = f"{transformer / GIB:.1f} + {(sum(need.components.values()) - transformer) / GIB:.1f} GiB"
        cells = [least_offload(file_format, gb) or "no" for gb in GPU_SIZES_GB]
        cells = [
            "fits" if cell == "none" else f"`--offload {cell}`" if cell != "no" else "no" for cell in cells
        ]
        rows.append(f"| {file_format} | {sizes} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def generate(pipe, steps: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    image = pipe(
        prompt="a lighthouse at dusk",
        width=512,
        height=512,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    return image, time.perf_counter() - started


def resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def cpu_run(out: Path, steps: int = 4) -> list[dict]:
    from safetensors.torch import load_file, save_file

    from octoflux.pipelines.export import export_transformer
    from octoflux.pipelines.loader import load_flux_pipeline
    from octoflux.pipelines.tiny import write_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="octoflux-files-"))
    folder = write_tiny_checkpoint(work / "tiny")
    for path in (folder / "transformer").glob("*.safetensors"):  # bf16-rounded: a bf16 file is exact
        save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(path).items()}, path)
    results, reference = [], None
    for file_format in CPU_TYPES:
        file = ""
        if file_format != "folder":
            suffix = ".gguf" if file_format.startswith("gguf:") else ".safetensors"
            file = str(
                export_transformer(folder, work / f"t-{file_format.replace(':', '-')}{suffix}", file_format)
            )
        started = time.perf_counter()
        pipe = load_flux_pipeline(str(folder), torch.device("cpu"), torch.float32, transformer_file=file)
        load_s = time.perf_counter() - started
        generate(pipe, 1)  # warm
        image, seconds = generate(pipe, steps)
        reference = image if reference is None else reference
        mse = float(((image - reference) ** 2).mean())
        results.append(
            {
                "type": file_format,
                "file_bytes": Path(file).stat().st_size if file else None,
                "transformer_resident_bytes": resident_bytes(pipe.transformer),
                "load_s": round(load_s, 3),
                "s_per_step_512": round(seconds / steps, 4),
                "psnr_db_vs_folder": None if mse == 0 else round(10 * float(np.log10(1 / mse)), 1),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            }
        )
    shutil.rmtree(work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformer_files.json").write_text(json.dumps(results, indent=2))
    (out / "transformer_files.md").write_text(summary(results))
    return results


def summary(results: list[dict]) -> str:
    lines = [
        "| type | file | resident | load | s/step (512x512, CPU) | PSNR vs folder |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        size = f"{r['file_bytes'] / 1e3:.0f} kB" if r["file_bytes"] else "-"
        psnr = "identical" if r["psnr_db_vs_folder"] is None else f"{r['psnr_db_vs_folder']} dB"
        lines.append(
            f"| {r['type']} | {size} | {r['transformer_resident_bytes'] / 1e3:.0f} kB | {r['load_s']} s "
            f"| {r['s_per_step_512']} | {psnr} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("table", "cpu"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    if args.what == "table":
        print(table())
    else:
        print(summary(cpu_run(args.out, args.steps)))


if __name__ == "__main__":
    main()
