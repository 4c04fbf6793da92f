"""What the durable async queue costs: the store's own work per job, and throughput against the
in-memory path.

    python -m benchmarks.queue                                   # SQLite in a temp dir, tiny model on the CPU
    python -m benchmarks.queue --redis-url redis://127.0.0.1:6379/0 --jobs 24

Store cost: per job, `enqueue_job` (the accept, with a stored text-to-image request), `lease_job`,
`renew_lease` and `finish_job` (with a ~1 MB body, a 1024x1024 PNG's size), timed one call at a time on
a store holding --store-jobs queued jobs (the lease query looks at all of them). Median and p90 ms.

Throughput: --jobs requests of the tiny model (or --model) against real `octoflux serve` processes:
sync requests from --jobs clients at once (the in-memory queue, as async jobs also ran before), async
jobs through one process, and async jobs with two processes sharing one store (every job sent to the
first; the second takes work from the store). Images per second from the first request to the last
result. JSON on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from benchmarks.scale import ROOT, free_port
from octoflux.core.stored_request import StoredRequest
from octoflux.pipelines.engine import GenerationSpec
from octoflux.state.records import COMPLETED, JobRecord
from octoflux.state.store import StateStore, open_state_store

BODY_BYTES = 2**20
FINAL = ("completed", "failed", "cancelled")


def _stats(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 3),
    }


def _timed(calls: list[Callable[[], object]]) -> dict:
    samples = []
    for call in calls:
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return _stats(samples)


def store_cost(store: StateStore, jobs: int, backlog: int) -> dict:
    """Per-job milliseconds of each queue operation, with `backlog` other jobs waiting."""
    spec = GenerationSpec(
        prompt="a lighthouse at dusk", width=1024, height=1024, steps=28, guidance=3.5, seeds=[7]
    )
    request = StoredRequest(spec, "octoai", {"encoding": "png"}).to_bytes()

    def record(owner: str) -> JobRecord:
        return JobRecord(uuid.uuid4().hex, owner, "bench", time.time(), replica="accepting")

    for n in range(backlog):
        store.enqueue_job(record(f"backlog-{n % 8}"), request, 3600)
    ids: list[str] = []
    enqueue = _timed([lambda: ids.append(store.enqueue_job(record("bench"), request, 3600).id)] * jobs)
    leased: list[str] = []
    lease = _timed([lambda: leased.append(store.lease_job("bench", 30.0).record.id)] * jobs)
    renew = _timed([lambda job_id=job_id: store.renew_lease(job_id, "bench", 30.0) for job_id in leased])
    body = os.urandom(BODY_BYTES)
    finish = _timed(
        [lambda job_id=job_id: store.finish_job(job_id, COMPLETED, body=body) for job_id in leased]
    )
    total = sum(part["median_ms"] for part in (enqueue, lease, renew, finish))
    return {
        "enqueue": enqueue,
        "lease": lease,
        "renew": renew,
        "finish": finish,
        "per_job_median_ms": round(total, 3),
        "jobs": jobs,
        "backlog": backlog,
    }


@contextmanager
def serve(args, state_url: str, workdir: Path):
    port = free_port()
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--port", str(port), "--no-warmup"]
    command += ["--model", args.model, "--device", args.device, "--state-url", state_url]
    command += ["--lora-dir", str(workdir / "loras"), "--max-queue", str(4 * args.jobs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(workdir / f"serve-{port}.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: see {workdir}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def _body(args, n: int, label: str) -> dict:
    return {
        "prompt": f"a lighthouse {label} {n}",  # new prompts each round: no path gets cached embeddings
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": n + 1,
    }


def sync_throughput(args, url: str, label: str) -> float:
    with ThreadPoolExecutor(args.jobs) as pool:
        started = time.monotonic()
        answers = list(
            pool.map(
                lambda n: httpx.post(f"{url}/generate/flux-dev", json=_body(args, n, label), timeout=600),
                range(args.jobs),
            )
        )
        took = time.monotonic() - started
    assert all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    return args.jobs / took


def async_throughput(args, url: str, label: str) -> float:
    started = time.monotonic()
    with httpx.Client(timeout=60) as client:
        polls = [
            client.post(
                f"{url}/generate/flux-dev", json=_body(args, n, label), headers={"X-OctoAI-Async": "1"}
            ).json()["poll_url"]
            for n in range(args.jobs)
        ]
        waiting = set(polls)
        while waiting:
            for poll in list(waiting):
                status = client.get(poll).json()["status"]
                if status in FINAL:
                    assert status == "completed", status
                    waiting.discard(poll)
            time.sleep(0.02)
    return args.jobs / (time.monotonic() - started)


def throughput(args, state_url: str, workdir: Path) -> dict:
    """Median images/s over --rounds; the paths alternate within each round (the machine's load drifts)."""
    rates: dict[str, list[float]] = {"in_memory_sync_img_s": [], "async_1_process_img_s": []}
    with serve(args, state_url, workdir) as url:
        sync_throughput(args, url, "warm")
        for round_ in range(args.rounds):
            rates["in_memory_sync_img_s"].append(sync_throughput(args, url, f"sync {round_}"))
            rates["async_1_process_img_s"].append(async_throughput(args, url, f"async {round_}"))
    rates["async_2_processes_img_s"] = []
    with ExitStack() as both:
        first = both.enter_context(serve(args, state_url, workdir))
        second = both.enter_context(serve(args, state_url, workdir))
        sync_throughput(args, second, "warm")
        for round_ in range(args.rounds):
            rates["async_2_processes_img_s"].append(async_throughput(args, first, f"two {round_}"))
    return {name: round(statistics.median(values), 3) for name, values in rates.items()}


def summary(result: dict) -> str:
    lines = [
        "| store | enqueue | lease | renew | finish (1 MB body) | per job |",
        "|---|---|---|---|---|---|",
    ]
    for name, cost in result["store_cost"].items():
        parts = [
            f"{cost[op]['median_ms']} / {cost[op]['p90_ms']}"
            for op in ("enqueue", "lease", "renew", "finish")
        ]
        lines.append(f"| {name} | {' | '.join(parts)} | {cost['per_job_median_ms']} |")
    lines.append("(median / p90 ms, one call at a time)")
    if "throughput" in result:
        lines += ["", "| path | images/s |", "|---|---|"]
        rates = {name: value for name, value in result["throughput"].items() if name.endswith("_img_s")}
        lines += [f"| {name} | {value} |" for name, value in rates.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", help="also measure a Redis store (its db is flushed first)")
    parser.add_argument("--store-jobs", type=int, default=200, help="jobs timed per operation")
    parser.add_argument("--backlog", type=int, default=1000, help="other jobs queued while timing")
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--model", default=None, help="default: the tiny test model, written to a temp dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--start-timeout", type=float, default=180)
    args = parser.parse_args(argv)
    result: dict = {"store_cost": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        stores = {"sqlite": f"sqlite:///{workdir}/cost.db"}
        if args.redis_url:
            import redis

            redis.Redis.from_url(args.redis_url).flushdb()
            stores["redis"] = args.redis_url
        for name, url in stores.items():
            store = open_state_store(url)
            try:
                result["store_cost"][name] = store_cost(store, args.store_jobs, args.backlog)
            finally:
                store.close()
        if args.throughput:
            if args.model is None:
                from octoflux.pipelines.tiny import write_tiny_checkpoint

                args.model = str(write_tiny_checkpoint(workdir / "tiny"))
            result["throughput"] = throughput(args, f"sqlite:///{workdir}/throughput.db", workdir)
            result["throughput"].update(jobs=args.jobs, size=args.size, steps=args.steps, rounds=args.rounds)
    print(json.dumps(result, indent=2))
    print(summary(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
