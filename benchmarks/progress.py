"""What live progress costs: the worker's event write and latent preview per step, and watchers.

    python -m benchmarks.progress    # SQLite in a temp dir, previews on the CPU, a job watched 0 and 300x
    python -m benchmarks.progress --redis-url redis://127.0.0.1:6379/0 --device cuda --watchers ''

The event write is `StateStore.append_event` with a progress event (what the worker does at every
step of an async job); the preview is `octoflux.pipelines.preview.preview_data_url` on packed latents
of each size (projection, resize to 256 px, JPEG) plus its write. The store read with nothing new
(`events_after`) is timed too. Median and p90 milliseconds.

Measured on a 2-core CPU shared with other work (OMP_NUM_THREADS=1, median / p90 ms):
| what | SQLite (WAL, local disk) | Redis 7 on loopback |
|---|---|---|
| progress event write (every step) | 0.020 / 0.03 | 0.049 / 0.062 |
| event read, nothing new | 0.002 / 0.003 | 0.22 / 0.28 |
| preview event write (~17-21 KB) | 0.07-0.08 / 0.11 | not measured |

| preview (projection, 256 px resize, JPEG q75) | median | p90 | data URL |
|---|---|---|---|
| 512x512 output | 0.9 ms | 5.0 ms | 17 KB |
| 1024x1024 output | 1.4-1.6 ms | 5.5-6.0 ms | 20.5 KB |
Not measured on a GPU yet.

Watchers: one async job (`--job-size`, `--job-steps`) run with each count of `--watchers` SSE
streams open on it, the counts alternating in each of `--job-runs` rounds, against a server in this
process on the tiny model. The watchers live in a child process; they connect while a blocker job
holds the worker (it is cancelled once they have), so all of them are open when the measured job
starts, then read at the lowest CPU priority (clients belong on other machines). The job's time is
the engine's own (`prediction_time_ms` of its result). JSON on stdout, a summary table on stderr.

Measured on the 2-core CPU shared with other work (load average 4-5), 512x512, 30 steps, 7 rounds,
median (fastest) engine seconds:
| watchers | one store reader per watcher | one reader per job, a chunk per read |
|---|---|---|
| 0 | 0.928 (0.767) | 0.840 (0.662) |
| 300 | 1.904 (1.326): +105% | 0.964 (0.772): +15% |
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import torch

from benchmarks.server import serve
from octoflux.core.progress import preview_event, progress_event, stored_event
from octoflux.pipelines.preview import preview_data_url
from octoflux.settings import Settings
from octoflux.state.records import JobRecord
from octoflux.state.store import StateStore, open_state_store


def _timed(fn, repeat: int) -> dict:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[int(0.9 * len(samples))], 3),
    }


def _job(store: StateStore, job_id: str) -> None:
    store.create_job(
        JobRecord(id=job_id, owner=None, request_id="bench", created_at=time.time(), replica="b")
    )


def measure_store(store: StateStore, repeat: int) -> dict:
    _job(store, "bench-events")
    step = stored_event(progress_event(7, 28, 0, 3.5))
    results = {"append_progress": _timed(lambda: store.append_event("bench-events", step), repeat)}
    seq = store.append_event("bench-events", step)
    results["poll_nothing_new"] = _timed(lambda: store.events_after("bench-events", seq), repeat)
    return results


def measure_previews(store: StateStore, device: torch.device, sizes: list[int], repeat: int) -> dict:
    _job(store, "bench-previews")
    results = {}
    for side in sizes:
        latents = torch.randn(1, (side // 16) ** 2, 64, device=device, dtype=torch.bfloat16)
        url = preview_data_url(latents, side, side)

        def make(latents=latents, side=side):
            preview_data_url(latents, side, side)
            if device.type == "cuda":
                torch.cuda.synchronize()

        event = stored_event(preview_event(4, 28, 0, url))
        results[f"{side}x{side}"] = {
            "preview": _timed(make, repeat),
            "append_preview": _timed(lambda event=event: store.append_event("bench-previews", event), repeat),
            "data_url_bytes": len(url),
        }
    return results


JOB_PROMPT = "a lighthouse on a cliff at night"
CONNECT_TIMEOUT_S = 120.0
BLOCKER_STEPS = 200  # the most a request may ask for


def _watch_in_child(conn: Connection, count: int) -> None:
    """In the child: open `count` streams on the URL sent, say when all answered, then what each got."""
    conn.send("ready")
    url = conn.recv()
    asyncio.run(_watch(conn, url, count))


async def _watch(conn: Connection, url: str, count: int) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client, AsyncExitStack() as streams:
        opened = [streams.enter_async_context(client.stream("GET", url)) for _ in range(count)]
        responses = await asyncio.gather(*opened)
        conn.send([response.status_code for response in responses])
        os.nice(19)  # clients belong on other machines: here they read with the CPU the server leaves
        cpu_before = time.process_time()
        received = await asyncio.gather(*(_events_of(response) for response in responses))
        conn.send((received, time.process_time() - cpu_before))


async def _events_of(response: httpx.Response) -> list[str]:
    return [
        line.removeprefix("event: ") async for line in response.aiter_lines() if line.startswith("event:")
    ]


def _submit(client: httpx.Client, url: str, size: tuple[int, int], steps: int, seed: int) -> str:
    body = {"prompt": JOB_PROMPT, "width": size[0], "height": size[1], "steps": steps, "seed": seed}
    response = client.post(f"{url}/generate/flux-dev", json=body, headers={"X-OctoAI-Async": "1"})
    if response.status_code != 202:
        raise RuntimeError(f"the job was refused: {response.status_code} {response.text}")
    return response.json()["response_id"]


def _status(client: httpx.Client, url: str, response_id: str) -> str:
    return client.get(f"{url}/v1/responses/{response_id}").json()["status"]


def _wait_final(client: httpx.Client, url: str, response_id: str) -> str:
    while (status := _status(client, url, response_id)) in ("pending", "running"):
        time.sleep(0.1)
    return status


def _start_watchers(count: int) -> tuple[multiprocessing.Process, Connection]:
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_watch_in_child, args=(theirs, count))
    child.start()
    if not ours.poll(CONNECT_TIMEOUT_S) or ours.recv() != "ready":
        raise RuntimeError("the watchers' process did not start")
    return child, ours


def _connected(conn: Connection, watchers: int) -> None:
    if not conn.poll(CONNECT_TIMEOUT_S):
        raise RuntimeError(f"{watchers} watchers did not connect in {CONNECT_TIMEOUT_S:.0f} s")
    statuses = conn.recv()
    if set(statuses) != {200}:
        raise RuntimeError(f"watchers were answered {sorted(set(statuses))}")


def time_job(url: str, watchers: int, size: tuple[int, int], steps: int, seed: int) -> dict:
    """One measured job with `watchers` streams open on it from before it starts to its end.

    A long blocker job holds the worker while the watchers connect, and is cancelled once they have.
    """
    child, conn = _start_watchers(watchers) if watchers else (None, None)
    with httpx.Client(timeout=None) as client:
        blocker = _submit(client, url, size, BLOCKER_STEPS, seed)
        job = _submit(client, url, size, steps, seed + 1)
        received: list[list[str]] = []
        watchers_cpu_s = 0.0
        if conn is not None:
            conn.send(f"{url}/v1/responses/{job}/events")
            _connected(conn, watchers)
        open_before_start = _status(client, url, job) == "pending"
        client.delete(f"{url}/v1/responses/{blocker}")
        status = _wait_final(client, url, job)
        result = client.get(f"{url}/v1/responses/{job}/result").json()
        if child is not None and conn is not None:
            received, watchers_cpu_s = conn.recv()
            child.join()
    expected = ["progress"] * steps + ["completed"]
    return {
        "watchers": watchers,
        "status": status,
        "job_s": round(result["prediction_time_ms"] / 1000, 3),
        "watchers_open_before_start": open_before_start,
        # The clients share this machine's cores with the server: what they used while reading.
        "watchers_cpu_s": round(watchers_cpu_s, 3),
        "watchers_with_every_event": sum(events == expected for events in received),
    }


def measure_watchers(counts: list[int], size: tuple[int, int], steps: int, rounds: int, device: str) -> dict:
    """Job time per watcher count, the counts alternating in each round."""
    from octoflux.app import build_engine

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model="tiny", device=device, warmup=False, max_batch=1, state_dir=Path(tmp))
        engine = build_engine(settings)
        with serve(engine, settings) as url:
            time_job(url, 0, size, 2, seed=1)  # first request: lazy setup
            runs = [
                time_job(url, count, size, steps, seed=10 + 2 * r) for r in range(rounds) for count in counts
            ]
    by_count = {}
    for count in counts:
        mine = [run for run in runs if run["watchers"] == count]
        by_count[str(count)] = {
            "median_job_s": round(statistics.median(run["job_s"] for run in mine), 3),
            "min_job_s": min(run["job_s"] for run in mine),
            "runs": mine,
        }
    return {"size": f"{size[0]}x{size[1]}", "steps": steps, "rounds": rounds, "by_watchers": by_count}


def summary(report: dict) -> str:
    watchers = report["watchers"]
    lines = [
        f"one async job, {watchers['size']}, {watchers['steps']} steps, tiny model, engine seconds over "
        f"{watchers['rounds']} rounds:",
        f"  {'watchers':>8}  {'median':>14}  {'fastest':>14}  watchers' own CPU (median)",
    ]
    base: dict | None = None
    for count, found in watchers["by_watchers"].items():
        base = found if base is None else base
        median, fastest = found["median_job_s"], found["min_job_s"]
        cpu = statistics.median(run["watchers_cpu_s"] for run in found["runs"])
        every = all(run["watchers_with_every_event"] == run["watchers"] for run in found["runs"])
        early = all(run["watchers_open_before_start"] for run in found["runs"])
        lines.append(
            f"  {count:>8}  {median:6.3f} s {(median / base['median_job_s'] - 1) * 100:+4.0f}%"
            f"  {fastest:6.3f} s {(fastest / base['min_job_s'] - 1) * 100:+4.0f}%  {cpu:.3f} s"
            + ("" if every else "  [some watchers missed events]")
            + ("" if early else "  [watchers connected after the job started]")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="also measure a Redis store (its keys get an octoflux: prefix)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--watchers", default="0,300", help="watcher counts to time a job with ('' skips)")
    parser.add_argument("--job-size", default="512x512")
    parser.add_argument("--job-steps", type=int, default=30)
    parser.add_argument("--job-runs", type=int, default=3, help="rounds; each times every watcher count once")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict = {"device": str(device), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = open_state_store(f"sqlite:///{Path(tmp).resolve()}/state.db")
        report["sqlite"] = measure_store(sqlite, args.repeat)
        report["previews"] = measure_previews(sqlite, device, sizes, max(20, args.repeat // 4))
        sqlite.close()
    if args.redis_url:
        redis_store = open_state_store(args.redis_url)
        report["redis"] = measure_store(redis_store, args.repeat)
        redis_store.close()
    counts = [int(c) for c in args.watchers.split(",") if c.strip()]
    if counts:
        width, height = (int(v) for v in args.job_size.lower().split("x"))
        report["watchers"] = measure_watchers(
            counts, (width, height), args.job_steps, args.job_runs, args.device
        )
    print(json.dumps(report, indent=1))
    if counts:
        print(summary(report), file=sys.stderr)


if __name__ == "__main__":
    main()
