"""Latency of one image by context-parallel rank count: `octoflux serve --context-parallel N` for each N.

    python -m benchmarks.parallel --ranks 1,2                       # CPU smoke: 2 gloo ranks, tiny model
    python -m benchmarks.parallel --ranks 1,2,4,8 --optimize none,compile --device cuda \\
        --model /srv/FLUX.1-dev --steps 30 --width 1024 --height 1024 --out parallel.json

For each `--optimize` mode and rank count it starts the real server (1: one process, no parallelism),
waits for /readyz, sends one warm-up request then --runs requests one at a time (latency, not throughput),
stops the server with SIGTERM and counts the processes left. Each time is also given as a speed-up over
1 rank of the same mode and over 1 rank of the first mode (eager), measured in the same run. Prints the
JSON rows and a markdown table; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.scale import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready within {timeout}s")


def run_one(args, mode: str, ranks: int, workdir: Path) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--port", str(port)]
    command += ["--model", args.model, "--device", args.device, "--context-parallel", str(ranks)]
    command += ["--optimize", mode, "--warmup-sizes", f"{args.width}x{args.height}", "--warmup-steps", "2"]
    command += ["--state-dir", str(workdir / f"state-{mode}-{ranks}"), "--lora-dir", str(workdir / "loras")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    log = (workdir / f"serve-{mode}-{ranks}.log").open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a lighthouse at dusk", "width": args.width, "height": args.height, "steps": args.steps}
    seconds: list[float] = []
    try:
        started = time.monotonic()
        wait_ready(url, server, args.start_timeout)
        startup_s = time.monotonic() - started
        family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        for run in range(args.runs + 1):  # the first is a warm-up
            t0 = time.monotonic()
            response = httpx.post(f"{url}/generate/flux-dev", json={**body, "seed": run + 1}, timeout=1800)
            response.raise_for_status()
            if run:
                seconds.append(time.monotonic() - t0)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=300)
        log.close()
    time.sleep(1.0)
    left = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return {
        "optimize": mode,
        "ranks": ranks,
        "median_s": round(statistics.median(seconds), 3),
        "min_s": round(min(seconds), 3),
        "runs": len(seconds),
        "startup_s": round(startup_s, 1),
        "exit_code": code,
        "processes_left": len(left),
    }


def with_ratios(rows: list[dict]) -> list[dict]:
    """Speed-up over 1 rank of the same mode, and over 1 rank of the first mode (eager)."""
    one_rank = {r["optimize"]: r["median_s"] for r in rows if r["ranks"] == 1}
    first = one_rank.get(rows[0]["optimize"]) if rows else None
    for row in rows:
        same = one_rank.get(row["optimize"])
        row["vs_1_rank"] = round(same / row["median_s"], 2) if same else None
        row["vs_1_rank_first_mode"] = round(first / row["median_s"], 2) if first else None
    return rows


def table(rows: list[dict], args) -> str:
    head = (
        f"one {args.width}x{args.height} image, {args.steps} steps, median of {args.runs}, "
        f"--device {args.device}, model {args.model}\n\n"
        f"| optimize | ranks | median (s) | vs 1 rank | vs 1 rank {rows[0]['optimize'] if rows else ''} "
        "| start (s) | exit | left after SIGTERM |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['optimize']} | {r['ranks']} | {r['median_s']} | {r['vs_1_rank']}x "
        f"| {r['vs_1_rank_first_mode']}x | {r['startup_s']} | {r['exit_code']} | {r['processes_left']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (1: one process)")
    parser.add_argument("--optimize", default="none", help="comma-separated --optimize modes, eager first")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--start-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="octoflux-parallel-") as tmp:
        rows = [
            run_one(args, mode, int(n), Path(tmp))
            for mode in args.optimize.split(",")
            for n in args.ranks.split(",")
        ]
    rows = with_ratios(rows)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(rows))
    print(table(rows, args))
    return rows


if __name__ == "__main__":
    main()
