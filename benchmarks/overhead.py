"""`python -m benchmarks.overhead`: the server's own milliseconds per request, PNG and JPEG.

Sequential requests against a server in this process; each request's overhead is the client's
wall time minus the engine's own time inside the server (`prediction_time_ms`): validation,
queueing, encoding, base64, JSON, HTTP and the client's parsing. Also times each PNG encoder
on the same images (fpng and Pillow at compress_level=1), which is how the encoder was chosen.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

from benchmarks.pipeline import PROMPT, Shape, spec_for
from benchmarks.server import _post, request_body, serve
from octoflux.core.codec import PNG_ENCODER, jpeg_bytes, png_bytes
from octoflux.settings import Settings

log = logging.getLogger("benchmarks.overhead")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--weights", default="tiny")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--sizes", default="512x512,1024x1024")
    parser.add_argument("--encodings", default="png,jpeg")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7, help="timed requests per size and encoding")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.size_list = [Shape.parse(s) for s in args.sizes.split(",") if s.strip()]
    args.encoding_list = [e.strip() for e in args.encodings.split(",") if e.strip()]
    return args


def encoder_ms(images, runs: int = 5) -> dict:
    """Median milliseconds per image for each PNG encoder available, and JPEG."""
    import importlib.util

    encoders = {"pillow-png": lambda im: png_bytes(im, "pillow"), "jpeg": jpeg_bytes}
    if importlib.util.find_spec("fpng") is not None:
        encoders["fpng-png"] = lambda im: png_bytes(im, "fpng")
    found = {}
    for name, encode in encoders.items():
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            for image in images:
                encode(image)
            times.append((time.perf_counter() - started) * 1000 / len(images))
        found[name] = statistics.median(times)
    return found


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from octoflux.app import build_engine

    settings = Settings(model=args.weights, device=args.device, warmup=False, max_batch=1)
    engine = build_engine(settings)
    results = dict(
        meta=dict(
            command="python -m benchmarks.overhead " + shlex.join(sys.argv[1:] if argv is None else argv),
            weights=args.weights,
            device=str(engine.device),
            torch=torch.__version__,
            steps=args.steps,
            png_encoder=PNG_ENCODER,
        ),
        rows=[],
    )
    with serve(engine, settings) as url, httpx.Client(timeout=None) as client:
        for shape in args.size_list:
            images = engine.generate(spec_for(shape, args.steps, PROMPT, seed=5)).images
            encoders = encoder_ms(images)
            for encoding in args.encoding_list:
                runs = []
                for i in range(args.runs + 1):  # the first request is a warm-up
                    body = request_body(shape, args.steps, f"{PROMPT} ({encoding} {i})", seed=100 + i)
                    runs.append(_post(client, url, {**body, "image_encoding": encoding}))
                runs = runs[1:]
                engine_s = statistics.median(r.prediction_seconds for r in runs)
                overhead_ms = statistics.median((r.seconds - r.prediction_seconds) * 1000 for r in runs)
                row = dict(
                    size=f"{shape.width}x{shape.height}",
                    encoding=encoding,
                    engine_ms=engine_s * 1000,
                    request_ms=statistics.median(r.seconds for r in runs) * 1000,
                    overhead_ms=overhead_ms,
                    overhead_share=overhead_ms / (engine_s * 1000),
                    encode_ms=encoders["jpeg"] if encoding == "jpeg" else encoders.get(f"{PNG_ENCODER}-png"),
                    encoders_ms=encoders,
                )
                log.info("%s %s: %s", row["size"], encoding, row)
                results["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out / "overhead.md").write_text(text)
    print(text)
    return results


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# Server overhead per request: {meta['weights']} on {meta['device']}, {meta['steps']} step(s), "
        f"PNG by {meta['png_encoder']}",
        "",
        f"`{meta['command']}`",
        "",
        "| size | encoding | engine ms | request ms | overhead ms | overhead / engine | encode ms "
        "| fpng / Pillow PNG / JPEG ms per image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        enc = row["encoders_ms"]
        each = " / ".join(f"{enc[k]:.1f}" if k in enc else "–" for k in ("fpng-png", "pillow-png", "jpeg"))
        lines.append(
            f"| {row['size']} | {row['encoding']} | {row['engine_ms']:.0f} | {row['request_ms']:.0f} "
            f"| {row['overhead_ms']:.1f} | {100 * row['overhead_share']:.1f}% "
            f"| {row['encode_ms']:.1f} | {each} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
