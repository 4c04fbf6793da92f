"""Throughput and latency by replica count: `octoflux serve --replicas N` for each N, side by side.

    python -m benchmarks.scale --replicas 1,2                       # tiny model on the CPU
    python -m benchmarks.scale --replicas 1,2,4,8 --device cuda --model black-forest-labs/FLUX.1-dev \\
        --steps 28 --width 1024 --height 1024 --concurrency 16 --requests 160

For each count it starts the real server (1: a single process without Ray; more: Ray Serve with its
own local Ray instance), waits until every replica answers, sends --requests generate calls from
--concurrency clients, then stops the server with SIGTERM and checks that none of its processes
(Ray's included) is left. Prints a markdown table; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def wait_for_replicas(url: str, replicas: int, timeout: float) -> None:
    deadline, seen = time.monotonic() + timeout, set()
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(seen)} of {replicas} replicas answered within {timeout}s")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                seen.add(httpx.get(f"{url}/healthz", timeout=5).json()["replica"])
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def run_one(args, replicas: int, workdir: Path) -> dict:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "octoflux.cli",
        "serve",
        "--replicas",
        str(replicas),
        "--port",
        str(port),
    ]
    command += ["--model", args.model, "--device", args.device, "--max-queue", str(args.max_queue)]
    command += ["--state-dir", str(workdir / f"state-{replicas}"), "--lora-dir", str(workdir / "loras")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    log = (workdir / f"serve-{replicas}.log").open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a lighthouse at dusk", "width": args.width, "height": args.height, "steps": args.steps}
    try:
        started = time.monotonic()
        wait_for_replicas(url, replicas, args.start_timeout)
        startup_s = time.monotonic() - started
        family = psutil.Process(server.pid).children(recursive=True) + [psutil.Process(server.pid)]

        def one(i: int) -> tuple[int, float, str | None]:
            t0 = time.monotonic()
            response = httpx.post(f"{url}/generate/flux-dev", json={**body, "seed": i + 1}, timeout=600)
            return response.status_code, time.monotonic() - t0, response.headers.get("x-octoflux-replica")

        with ThreadPoolExecutor(args.concurrency) as pool:  # warm every replica's first request
            list(pool.map(one, range(args.concurrency)))
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.monotonic() - t0
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        log.close()
    time.sleep(1.0)
    left = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    ok = [seconds for status, seconds, _ in results if status == 200]
    spread: dict[str, int] = {}
    for status, _, replica in results:
        if status == 200 and replica:
            spread[replica] = spread.get(replica, 0) + 1
    return {
        "replicas": replicas,
        "requests": args.requests,
        "ok": len(ok),
        "statuses": sorted({status for status, _, _ in results}),
        "throughput_rps": round(len(ok) / wall, 3),
        "p50_s": round(percentile(ok, 0.5), 3),
        "p99_s": round(percentile(ok, 0.99), 3),
        "per_replica": sorted(spread.values(), reverse=True),
        "startup_s": round(startup_s, 1),
        "exit_code": code,
        "processes_left": len(left),
    }


def table(rows: list[dict], args) -> str:
    head = (
        f"{args.requests} requests, {args.concurrency} clients, {args.width}x{args.height}, "
        f"{args.steps} steps, --device {args.device}, model {args.model}\n\n"
        "| replicas | throughput (img/s) | vs 1 | p50 (s) | p99 (s) | ok | per replica | start (s) "
        "| left after SIGTERM |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    base = rows[0]["throughput_rps"] or float("nan")
    lines = [
        f"| {r['replicas']} | {r['throughput_rps']} | {r['throughput_rps'] / base:.2f}x | {r['p50_s']} "
        f"| {r['p99_s']} | {r['ok']}/{r['requests']} | {r['per_replica']} | {r['startup_s']} "
        f"| {r['processes_left']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="octoflux-scale-") as tmp:
        rows = [run_one(args, int(n), Path(tmp)) for n in args.replicas.split(",")]
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(rows))
    print(table(rows, args))


if __name__ == "__main__":
    main()
