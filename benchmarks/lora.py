"""LoRA load and switch times on the resident pipeline (tiny FLUX on CPU by default).

    python -m benchmarks.lora [--repeats 20] [--rank 4] [--out bench-results/lora.json]

load:   first use of a LoRA file: read + check + convert + attach as an adapter (cold, then evicted).
switch: changing the active set between two resident adapters (set_adapters / enable).
none:   back to no adapter active (what a request without `loras` pays).
compiled: the same switches in slot mode (--optimize compile: 2 hot-swap slots, transformer
        blocks torch.compiled, traced with dynamo's eager backend on CPU), one generation each,
        with the number of graphs dynamo compiled after warm-up (0: no recompiles).
Each figure is the median of `--repeats` runs, measured through `LoraCache.activate`, the call
`Engine.generate` makes on the worker thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from octoflux.pipelines.loras import LoraCache, LoraLibrary
from octoflux.pipelines.tiny import write_tiny_checkpoint
from octoflux.pipelines.tiny_lora import make_lora, save_diffusers


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def run(repeats: int, rank: int) -> dict:
    from diffusers import FluxPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe = FluxPipeline.from_pretrained(str(write_tiny_checkpoint(tmp / "tiny")))
        library = LoraLibrary(tmp / "loras")
        for i, name in enumerate(("a", "b")):
            save_diffusers(make_lora(i + 1, rank=rank, text_encoder=True), library.path(name))
        cache = LoraCache(pipe, library, cache_size=2)

        loads = []
        for _ in range(repeats):
            started = time.perf_counter()
            cache.activate({"a": 1.0})
            loads.append(time.perf_counter() - started)
            cache._evict("a", why="benchmark")  # cold again for the next sample

        cache.activate({"a": 1.0})
        cache.activate({"b": 1.0})
        switches, to_none = [], []
        for i in range(repeats):
            started = time.perf_counter()
            cache.activate({"a": 1.0} if i % 2 else {"b": 0.8})
            switches.append(time.perf_counter() - started)
            started = time.perf_counter()
            cache.activate({})
            to_none.append(time.perf_counter() - started)
        assert cache.stats.evictions >= repeats and sorted(cache.resident) == ["a", "b"]
    compiled = run_compiled(repeats, rank)
    return {
        "model": "tiny FLUX (random weights)",
        "lora": f"rank {rank} on transformer to_q/to_k/to_v/to_out.0 + CLIP q/k/v/out_proj",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "repeats": repeats,
        "load_ms_median": _median_ms(loads),
        "switch_ms_median": _median_ms(switches),
        "to_no_lora_ms_median": _median_ms(to_none),
        "load_ms_all": [s * 1000 for s in loads],
        "switch_ms_all": [s * 1000 for s in switches],
        "compiled": compiled,
    }


def run_compiled(repeats: int, rank: int) -> dict:
    """Slot mode under torch.compile: hot-swap times and recompiles counted after warm-up."""
    from torch._dynamo.testing import CompileCounter

    from octoflux.pipelines.engine import Engine, GenerationSpec
    from octoflux.pipelines.loader import load_flux_pipeline
    from octoflux.pipelines.optimize import compile_transformer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe = load_flux_pipeline(
            str(write_tiny_checkpoint(tmp / "tiny")), torch.device("cpu"), torch.float32
        )
        library = LoraLibrary(tmp / "loras")
        for i, name in enumerate(("a", "b", "c")):
            save_diffusers(make_lora(i + 1, rank=rank * (i + 1), text_encoder=i == 0), library.path(name))
        cache = LoraCache(pipe, library, cache_size=8, slots=2, max_rank=rank * 3)
        counter = CompileCounter()
        compile_transformer(pipe.transformer, fullgraph=True, backend=counter)
        engine = Engine(pipe, loras=cache)
        base = dict(prompt="a lighthouse", width=256, height=256, steps=2, guidance=3.5, seeds=[1])
        engine.generate(GenerationSpec(**base))
        warm = counter.frame_count
        sets = [{"a": 1.0}, {"b": 0.8}, {"a": 0.5, "c": 1.0}, {"c": 0.3}, {}]
        swaps = []
        for i in range(repeats):
            loras = sets[i % len(sets)]
            started = time.perf_counter()
            cache.activate(loras)
            swaps.append(time.perf_counter() - started)
            engine.generate(GenerationSpec(**base, loras=loras))
    return {
        "slots": 2,
        "ranks": [rank, rank * 2, rank * 3],
        "graphs_compiled_at_warmup": warm,
        "recompiles_after_warmup": counter.frame_count - warm,
        "switch_ms_median": _median_ms(swaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-results/lora.json"))
    args = parser.parse_args()
    result = run(args.repeats, args.rank)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"LoRA on {result['model']}, {result['device']}, median of {args.repeats}: "
        f"load {result['load_ms_median']:.1f} ms, switch {result['switch_ms_median']:.2f} ms, "
        f"back to none {result['to_no_lora_ms_median']:.2f} ms; compiled slots: switch "
        f"{result['compiled']['switch_ms_median']:.2f} ms, "
        f"{result['compiled']['recompiles_after_warmup']} recompiles  → {args.out}"
    )


if __name__ == "__main__":
    main()
