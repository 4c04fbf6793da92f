"""Load test: N concurrent clients send M generate requests to an octoflux server on loopback.

Reports throughput, p50/p99 latency, 429s (intended: the queue is bounded), errors (anything
else), and the server's resident memory before and after, read from its own /metrics.

    python benchmarks/load.py --spawn --clients 8 --requests 1000 --max-queue 4 --out load.json
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 4 --requests 100

With --spawn it starts `octoflux serve` on the tiny model itself and stops it afterwards. It only
talks to loopback addresses, and stops after --max-seconds whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    throttled_latencies: list[float] = field(default_factory=list)  # requests that saw a 429
    unthrottled_latencies: list[float] = field(default_factory=list)
    attempts: int = 0
    throttled: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (completed, MB)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def parse_rss_mb(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1]) / 2**20
    raise RuntimeError("server does not export process_resident_memory_bytes")


def resident_mb(client: httpx.Client) -> float:
    return parse_rss_mb(client.get("/metrics").text)


async def one_request(client: httpx.AsyncClient, payload: dict, tally: Tally, deadline: float) -> None:
    """One logical request: retried after Retry-After on 429, as the SDK does."""
    started = time.monotonic()
    throttled = False
    while time.monotonic() < deadline:
        tally.attempts += 1
        try:
            response = await client.post("/generate/flux-dev", json=payload)
        except httpx.HTTPError as exc:
            tally.error(type(exc).__name__)
            return
        if response.status_code == 429:
            tally.throttled += 1
            throttled = True
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            continue
        if response.status_code != 200:
            tally.error(f"http_{response.status_code}")
            return
        tally.latencies.append(time.monotonic() - started)
        (tally.throttled_latencies if throttled else tally.unthrottled_latencies).append(tally.latencies[-1])
        return
    tally.error("deadline")


async def drive(
    url: str, clients: int, requests: int, payload: dict, max_seconds: float, rss_every: int
) -> tuple[Tally, float]:
    tally = Tally()
    remaining = iter(range(requests))
    deadline = time.monotonic() + max_seconds
    finished = asyncio.Event()

    async def sample_rss() -> None:
        """The server's RSS every `rss_every` completed requests: growth should level off."""
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            next_mark = rss_every
            while not finished.is_set():
                if len(tally.latencies) >= next_mark:
                    rss = parse_rss_mb((await client.get("/metrics")).text)
                    tally.rss_samples.append((len(tally.latencies), round(rss, 1)))
                    next_mark += rss_every
                await asyncio.sleep(0.05)

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as client:
            for _ in remaining:
                if time.monotonic() > deadline:
                    return
                await one_request(client, payload, tally, deadline)

    started = time.monotonic()
    sampler = asyncio.ensure_future(sample_rss())
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    seconds = time.monotonic() - started
    finished.set()
    await sampler
    return tally, seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def spawned_server(model: str, max_queue: int, threads: int | None):
    port = free_port()
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--model", model, "--device", "cpu"]
    command += ["--port", str(port), "--max-queue", str(max_queue)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = Path(tempfile.gettempdir()) / f"octoflux-load-server-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited; see {log_path}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to load-test {host}: loopback only")


def run(args: argparse.Namespace, url: str) -> dict:
    require_loopback(url)
    payload = {"prompt": "load test", "width": 512, "height": 512, "steps": args.steps, "num_images": 1}
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(args.warmup):  # let allocator pools and caches settle before the baseline
            client.post("/generate/flux-dev", json=payload).raise_for_status()
        rss_before = resident_mb(client)
        tally, seconds = asyncio.run(
            drive(url, args.clients, args.requests, payload, args.max_seconds, args.rss_every)
        )
        rss_after = resident_mb(client)
    done = len(tally.latencies)
    return {
        "url": url,
        "clients": args.clients,
        "requests": args.requests,
        "completed": done,
        "steps": args.steps,
        "seconds": round(seconds, 2),
        "throughput_rps": round(done / seconds, 3) if seconds else 0.0,
        "latency_p50_s": round(percentile(tally.latencies, 0.50), 3),
        "latency_p99_s": round(percentile(tally.latencies, 0.99), 3),
        "latency_mean_s": round(statistics.fmean(tally.latencies), 3) if done else None,
        "latency_p50_throttled_s": round(percentile(tally.throttled_latencies, 0.50), 3),
        "latency_p99_unthrottled_s": round(percentile(tally.unthrottled_latencies, 0.99), 3),
        "requests_throttled": len(tally.throttled_latencies),
        "attempts": tally.attempts,
        "throttled_429": tally.throttled,
        "errors": tally.errors,
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "rss_samples_mb": tally.rss_samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (loopback only)")
    target.add_argument("--spawn", action="store_true", help="start `octoflux serve` on the tiny model")
    parser.add_argument("--model", default="tiny", help="with --spawn: the model to serve")
    parser.add_argument("--max-queue", type=int, default=4, help="with --spawn: the server's --max-queue")
    parser.add_argument("--threads", type=int, help="with --spawn: OMP_NUM_THREADS for the server")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20, help="requests before the RSS baseline")
    parser.add_argument("--rss-every", type=int, default=100, help="sample RSS every N requests")
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop issuing requests after this")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.spawn:
        with spawned_server(args.model, args.max_queue, args.threads) as url:
            report = run(args, url)
    else:
        report = run(args, args.url)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(
        f"\n{report['completed']}/{report['requests']} requests in {report['seconds']} s "
        f"({report['throughput_rps']} req/s) with {report['clients']} clients; "
        f"p50 {report['latency_p50_s']} s, p99 {report['latency_p99_s']} s; "
        f"{report['throttled_429']} x 429, errors {report['errors'] or 0}; "
        f"RSS {report['rss_before_mb']} -> {report['rss_after_mb']} MB ({report['rss_growth_mb']:+} MB)"
    )
    return 0 if not report["errors"] and report["completed"] == report["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
