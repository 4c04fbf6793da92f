"""`--replicas N`: the app on Ray Serve with CPU replicas of the tiny model, over Ray's real HTTP proxy.

One Ray instance for the module (`ray.init(num_cpus=2)`), its proxy on a loopback port, and one
deployment of the real `octoflux.deploy.replicas` application that every test shares; it is
replaced only where a test needs other settings or a full restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import b64_to_image, pixels
from helpers.engine_control import wait_until
from helpers.requests import ASYNC, AUTH, KEY, LORA_DATA, body
from helpers.services import free_port

from octoflux.pipelines.tiny_lora import make_lora, save_diffusers
from octoflux.settings import Settings

pytest.importorskip("ray.serve")

REPO = Path(__file__).resolve().parents[2]
ASYNC_AUTH = {**AUTH, **ASYNC}
POLL_S = 0.2  # between polls through the proxy: often enough, without loading Ray's proxy
FOX = "a red fox"
# The most steps at 1024x1024: a job still running when the test acts on it (it never finishes).
LONG = {"steps": 200, "width": 1024, "height": 1024, "num_images": 2}


class Deployment:
    """The module's one application on Ray Serve, deployed again only when other settings are asked for."""

    def __init__(self) -> None:
        self.settings: Settings | None = None

    def ensure(self, settings: Settings) -> str:
        """The URL of a deployment of `settings`: the running one, or a new one in its place."""
        from octoflux.deploy import replicas

        if self.settings != settings:
            self.remove()
            replicas.start(settings)
            self.settings = settings
        return f"http://127.0.0.1:{settings.port}"

    def remove(self) -> None:
        """Drain and remove every replica (a full restart, once `ensure` deploys again)."""
        from ray import serve

        from octoflux.deploy import replicas

        if self.settings is not None:
            self.settings = None
            serve.delete(replicas.APP_NAME)


@pytest.fixture(scope="module")
def proxy_port() -> Iterator[int]:
    from ray import serve

    from octoflux.deploy import replicas

    replicas.init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    replicas.stop(started_ray=True)


@pytest.fixture(scope="module")
def deployment(proxy_port) -> Iterator[Deployment]:
    deployment = Deployment()
    yield deployment
    deployment.remove()


@pytest.fixture(scope="module")
def base_settings(proxy_port, tiny_checkpoint, tmp_path_factory) -> Settings:
    return Settings(
        model=tiny_checkpoint,
        device="cpu",
        host="127.0.0.1",
        port=proxy_port,
        replicas="2",
        api_keys=KEY,
        max_queue=6,
        lora_dir=tmp_path_factory.mktemp("shared-loras"),
        state_dir=tmp_path_factory.mktemp("shared-state"),
        warmup=False,  # a replica's warm-up is proved once, by `octoflux serve` in test_replicas_sigterm.py
        shutdown_timeout=1,  # a restart interrupts the job it finds running after a second
    )


@pytest.fixture
def url(deployment, base_settings) -> str:
    """The shared deployment of `base_settings` (deployed on first use, or again after a test replaced it)."""
    return deployment.ensure(base_settings)


def replica_pids(url: str, want: int = 2, timeout: float = 60) -> dict[str, int]:
    """replica id -> pid, asking /healthz through the proxy until `want` replicas answered."""
    seen: dict[str, int] = {}

    def all_seen():
        health = httpx.get(f"{url}/healthz", headers=AUTH, timeout=10)  # pid and replica: for keys
        if health.status_code == 200:
            seen[health.json()["replica"]] = health.json()["pid"]
        return len(seen) >= want

    wait_until(all_seen, timeout, f"{want} replicas answering /healthz", every=0.05)
    return seen


def generate_many(url: str, n: int, **extra) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(
            pool.map(
                lambda i: httpx.post(
                    f"{url}/generate/flux-dev", json=body(FOX, **extra), headers=AUTH, timeout=120
                ),
                range(n),
            )
        )


def test_concurrent_requests_all_succeed_and_spread_over_both_replicas(url):
    responses = generate_many(url, 12)
    assert [r.status_code for r in responses] == [200] * 12, [
        r.text for r in responses if r.status_code != 200
    ]
    assert len({r.headers["x-octoflux-replica"] for r in responses}) == 2
    assert all(r.headers.get("x-request-id") for r in responses)
    assert httpx.post(f"{url}/generate/flux-dev", json=body(FOX)).status_code == 401  # auth as in one process


def test_async_job_submitted_and_polled_through_the_proxy(url):
    accepted = httpx.post(f"{url}/generate/flux-dev", json=body("async"), headers=ASYNC_AUTH, timeout=60)
    assert accepted.status_code == 202, accepted.text
    poll_url = accepted.json()["poll_url"]
    pollers: set[str] = set()

    def completed():
        poll = httpx.get(poll_url, headers=AUTH, timeout=10)
        pollers.add(poll.headers["x-octoflux-replica"])
        return poll.json() if poll.json()["status"] == "completed" else None

    status = wait_until(completed, 60, "the async job", every=POLL_S)
    results = [httpx.get(status["response_url"], headers=AUTH, timeout=10) for _ in range(6)]
    assert {r.status_code for r in results} == {200}
    assert len({r.content for r in results}) == 1  # the same stored body from every replica
    assert len(b64_to_image(results[0].json()["images"][0]["image_b64"]).getbbox() or ()) == 4


def test_uploaded_lora_is_listed_and_used_on_both_replicas(url, tmp_path):
    lora = save_diffusers(make_lora(11), tmp_path / "style.safetensors")
    created = httpx.post(
        f"{url}/v1/assets", json={"asset_type": "lora", "data": LORA_DATA, "name": "shared"}, headers=AUTH
    ).json()
    asset_id = created["asset"]["id"]
    assert httpx.put(created["transfer_api"]["put_url"], content=lora.read_bytes()).status_code == 200
    done = httpx.post(f"{url}/v1/assets/{asset_id}/complete-upload", json={}, headers=AUTH, timeout=60)
    assert done.status_code == 200 and done.json()["error"] is None, done.text
    listings = [httpx.get(f"{url}/v1/assets", headers=AUTH, timeout=10) for _ in range(8)]
    assert len({r.headers["x-octoflux-replica"] for r in listings}) == 2
    assert all(
        [a["status"] for a in r.json()["data"] if a["name"] == "shared"] == ["ready"] for r in listings
    )

    base = pixels(b64_to_image(generate_many(url, 1)[0].json()["images"][0]["image_b64"]))
    styled = generate_many(url, 8, loras={"shared": 1.0})
    assert {r.status_code for r in styled} == {200}, [r.text for r in styled]
    assert len({r.headers["x-octoflux-replica"] for r in styled}) == 2
    for response in styled:
        assert np.abs(pixels(b64_to_image(response.json()["images"][0]["image_b64"])) - base).mean() > 0.3


def test_every_replica_full_answers_429_with_retry_after_never_a_ray_error(url):
    # 2 replicas x 6 requests, as many again waiting in the proxy: 24 places. 30 steps keep them
    # taken while 60 requests arrive; here about 30 are answered 429 (on a slow machine, fewer).
    responses = generate_many(url, 60, steps=30)
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.headers["content-type"] == "application/json"
            assert "busy" in response.json()["detail"] and "ray" not in response.text.lower()


def test_replica_killed_mid_job_fails_its_sync_requests_fast_reruns_its_async_job_and_is_replaced(
    url, base_settings
):
    from octoflux.state.store import open_state_store

    pids = replica_pids(url)
    accepted = httpx.post(f"{url}/generate/flux-dev", json=body("doomed", **LONG), headers=ASYNC_AUTH)
    job_id = accepted.json()["response_id"]
    store = open_state_store(base_settings.resolved_state_url)
    running = wait_until(
        lambda: (r := store.get_job(job_id)) and r.status != "pending" and r, 60, "job start", every=POLL_S
    )
    assert running.status == "running"
    victim = running.replica
    outcomes: list[tuple[float, httpx.Response]] = []

    def sync_request():
        response = httpx.post(f"{url}/generate/flux-dev", json=body(FOX), headers=AUTH, timeout=120)
        outcomes.append((time.monotonic(), response))

    # Four sync requests: the proxy spreads them by load, so some wait behind the async job.
    threads = [threading.Thread(target=sync_request) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # every sync request has reached a replica
    killed_at = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    lost = [(at, r) for at, r in outcomes if r.status_code != 200]
    assert len(outcomes) == 4 and lost, [(r.status_code, r.text) for _, r in outcomes]
    for at, response in lost:  # the victim's requests: our JSON 503, within seconds; the rest ran
        assert response.status_code == 503 and "worker" in response.json()["detail"]
        assert "lost" in response.json()["detail"] and at - killed_at < 10

    # The async job's lease lapses and another replica runs it again (it is far too long to finish here).
    rerun = wait_until(
        lambda: (r := store.get_job(job_id)) and r.attempts == 2 and r.status == "running" and r,
        60,
        "the async job to run again",
        every=POLL_S,
    )
    assert rerun.replica != victim
    assert httpx.get(accepted.json()["poll_url"], headers=AUTH).json()["status"] == "running"
    assert httpx.delete(accepted.json()["poll_url"], headers=AUTH).json()["status"] == "cancelled"
    store.close()

    again = replica_pids(url, want=2, timeout=90)  # Ray replaced the replica: full size again
    assert pids[victim] not in again.values() and victim not in again
    assert {r.status_code for r in generate_many(url, 4)} == {200}


def upload(url: str, name: str, path: Path) -> str:
    created = httpx.post(
        f"{url}/v1/assets", json={"asset_type": "lora", "data": LORA_DATA, "name": name}, headers=AUTH
    ).json()
    assert httpx.put(created["transfer_api"]["put_url"], content=path.read_bytes()).status_code == 200
    httpx.post(f"{url}/v1/assets/{created['asset']['id']}/complete-upload", json={}, headers=AUTH, timeout=60)
    return created["asset"]["id"]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_full_restart_keeps_results_and_assets_and_reruns_unfinished_jobs(
    backend, request, deployment, base_settings, tmp_path
):
    if backend == "redis":
        import redis

        state_url = f"{request.getfixturevalue('redis_base_url')}/3"
        redis.Redis.from_url(state_url).flushdb()
        # One replica: this deployment is new anyway, and a restart of one shows the same as of two.
        update = {"state_url": state_url, "lora_dir": tmp_path / "loras", "replicas": "1"}
        settings = base_settings.model_copy(update=update)
    else:
        settings = base_settings  # the module's deployment, if it runs, is the one before the restart
    lora = save_diffusers(make_lora(12), tmp_path / "kept.safetensors")
    url = deployment.ensure(settings)
    asset_id = upload(url, f"kept-{backend}", lora)
    done = httpx.post(f"{url}/generate/flux-dev", json=body("kept"), headers=ASYNC_AUTH).json()
    wait_until(
        lambda: httpx.get(done["poll_url"], headers=AUTH).json()["status"] == "completed",
        60,
        "job",
        every=POLL_S,
    )
    before = httpx.get(f"{done['poll_url']}/result", headers=AUTH).content
    unfinished = httpx.post(f"{url}/generate/flux-dev", json=body("cut", **LONG), headers=ASYNC_AUTH)

    deployment.remove()  # every replica gone; started again on the same store
    url = deployment.ensure(settings)
    assert httpx.get(f"{done['poll_url']}/result", headers=AUTH).content == before
    asset = httpx.get(f"{url}/v1/assets/{asset_id}", headers=AUTH).json()["asset"]
    assert (asset["name"], asset["status"]) == (f"kept-{backend}", "ready")
    # The job the restart cut is not lost: it finished during the drain, or it runs again (then it is
    # cancelled: it is far too long to wait for here).
    polls: list[dict] = []
    wait_until(
        lambda: (
            polls.append(httpx.get(unfinished.json()["poll_url"], headers=AUTH).json())
            or polls[-1]["status"] in ("running", "completed", "failed", "cancelled")
        ),
        60,
        "the unfinished job to run again",
        every=POLL_S,
    )
    assert polls[-1]["status"] in ("running", "completed"), polls[-1]
    if polls[-1]["status"] == "running":
        assert httpx.delete(unfinished.json()["poll_url"], headers=AUTH).json()["status"] == "cancelled"
    # After the cut job (which would hold a replica's worker for minutes): the kept LoRA asset still serves.
    styled = httpx.post(
        f"{url}/generate/flux-dev", json=body(FOX, loras={f"kept-{backend}": 1.0}), headers=AUTH, timeout=60
    )
    assert styled.status_code == 200, styled.text


def test_single_process_mode_does_not_import_ray(tiny_checkpoint, tmp_path):
    code = (
        "import sys\n"
        "import octoflux.cli\n"
        "from octoflux.app import create_app\n"
        "from octoflux.settings import Settings\n"
        "settings = Settings(replicas='1', device='cpu')\n"
        "assert not settings.uses_ray\n"
        "create_app(settings)\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OCTOFLUX_STATE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_single_process_names_its_replica_too(live_server):
    health = httpx.get(f"{live_server.url}/healthz")
    assert health.headers["x-octoflux-replica"] == health.json()["replica"] == live_server.service.replica
    assert health.json()["pid"] == os.getpid()


def test_bad_state_url_stops_serve_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [  # side by side: each spends its seconds importing
        subprocess.Popen(
            [sys.executable, "-m", "octoflux.cli", "serve", "--replicas", "2", "--state-url", url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for url in ("postgres://db/state", "redis://127.0.0.1:1/0")
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=60)
        assert run.returncode != 0
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("octoflux: "), stderr


def test_replica_options_size_the_load_limits_from_the_queue():
    from octoflux.deploy.replicas import deployment_options, replica_count

    gpu = Settings(max_queue=8, device="cuda", replicas="auto")
    options = deployment_options(gpu, replica_count(gpu, gpus=4))
    assert options["num_replicas"] == 4 and options["ray_actor_options"] == {"num_gpus": 1}
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (8, 32)
    scaled = deployment_options(Settings(device="cpu", min_replicas=1, max_replicas=3), 2)
    assert "num_replicas" not in scaled and scaled["ray_actor_options"] == {"num_cpus": 1}
    assert scaled["autoscaling_config"]["min_replicas"] == 1
    assert scaled["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(SystemExit, match="no GPU"):
        replica_count(Settings(replicas="auto"), gpus=0)
    with pytest.raises(ValueError):
        Settings(replicas="0")
