"""Server-level measurement: the same requests over HTTP against a server around the same engine."""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from benchmarks.pipeline import PROMPT, Shape
from octoflux.core.codec import encode_images
from octoflux.deploy.embedded import serve_in_thread
from octoflux.pipelines.engine import Engine
from octoflux.settings import Settings


@contextmanager
def serve(engine: Engine, settings: Settings) -> Iterator[str]:
    """Serve `engine` (already built and warmed) in this process; yields the base URL."""
    settings = settings.model_copy(update=dict(warmup=False, api_keys=""))
    with serve_in_thread(settings, engine_factory=lambda *_: engine) as (url, _app):
        yield url


def request_body(shape: Shape, steps: int, prompt: str, seed: int) -> dict:
    return dict(
        prompt=prompt,
        width=shape.width,
        height=shape.height,
        steps=steps,
        num_images=shape.batch,
        seed=seed,
        image_encoding="png",
    )


@dataclass
class ServerRun:
    seconds: float
    prediction_seconds: float


def _post(client: httpx.Client, url: str, body: dict) -> ServerRun:
    started = time.perf_counter()
    response = client.post(f"{url}/generate/flux-dev", json=body)
    response.raise_for_status()
    payload = response.json()  # a client parses the JSON and gets the base64 images
    for image in payload["images"]:
        base64.b64decode(image["image_b64"])
    return ServerRun(time.perf_counter() - started, payload["prediction_time_ms"] / 1000)


def measure_server(url: str, shape: Shape, steps: int, warmup: int, runs: int) -> dict:
    """Sequential requests: wall time per request, and the engine's own time inside it."""
    with httpx.Client(timeout=None) as client:
        for i in range(warmup):
            _post(client, url, request_body(shape, steps, f"{PROMPT} (server warm-up {i})", seed=1))
        done = [
            _post(client, url, request_body(shape, steps, f"{PROMPT} (server run {i})", seed=1000 + i))
            for i in range(runs)
        ]
    seconds = [run.seconds for run in done]
    inside = [run.prediction_seconds for run in done]
    return dict(
        server_median_s=statistics.median(seconds),
        server_engine_median_s=statistics.median(inside),
        # Queueing, validation, PNG encoding, base64, JSON and HTTP, per request.
        server_extra_s=statistics.median(s - p for s, p in zip(seconds, inside, strict=True)),
        server_all_seconds=seconds,
    )


def measure_overlap(url: str, shape: Shape, steps: int, requests: int, clients: int = 2) -> dict:
    """`clients` concurrent clients: does encoding job N overlap the GPU work of job N+1?

    The worker hands a finished job's images back and starts the next job at once; the handler
    encodes them in the HTTP threadpool. With overlap, wall time ~ requests x generation time.
    """

    def one(i: int) -> ServerRun:
        with httpx.Client(timeout=None) as client:
            return _post(client, url, request_body(shape, steps, f"{PROMPT} (overlap {i})", seed=2000 + i))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    engine_total = sum(run.prediction_seconds for run in done)
    return dict(
        concurrent_clients=clients,
        concurrent_requests=requests,
        concurrent_wall_s=wall,
        concurrent_engine_s=engine_total,
        # 1.0: the worker never waited on encoding or HTTP; >1: that share of time was serial.
        concurrent_wall_over_engine=wall / engine_total if engine_total else None,
        concurrent_images_per_min=60.0 * requests * shape.batch / wall,
    )


def encode_cost(engine: Engine, shape: Shape, steps: int) -> dict:
    """Milliseconds to PNG-encode (server settings) the images of one request, in parallel."""
    from benchmarks.pipeline import spec_for

    images = engine.generate(spec_for(shape, steps, PROMPT, seed=7)).images
    started = time.perf_counter()
    encoded = encode_images(images, "png")
    png_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    encode_images(images, "jpeg")
    jpeg_ms = (time.perf_counter() - started) * 1000
    png_b64_mb = sum(len(png) * 4 / 3 for png in encoded) / 2**20
    return dict(png_encode_ms=png_ms, jpeg_encode_ms=jpeg_ms, png_b64_mb=png_b64_mb)
