"""`octoflux serve --context-parallel 2 --device cpu`: two gloo ranks give one process's pixels, stop
together, and a lost rank ends the server with a 503 and one line, leaving no process behind."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from conftest import b64_to_image, gradient_image, image_to_b64, pixels
from helpers.engine_control import WAIT, wait_until
from helpers.requests import ASYNC, STEPS, URL_PATH, body, post_in_thread
from helpers.services import free_port, server_ready
from httpx_sse import connect_sse
from PIL import Image

from octoflux import cli
from octoflux.pipelines.tiny_lora import make_lora, save_diffusers
from octoflux.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INIT = gradient_image(512, 512)
# One 255th: the ranks' attention sums in another order than one process's.
TOLERANCE = 1


@dataclass
class RankedServer:
    process: subprocess.Popen
    url: str
    log: Path

    @property
    def ranks(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


@contextmanager
def serve_ranked(tiny_checkpoint: str, folder: Path, *flags: str) -> Iterator[RankedServer]:
    port = free_port()
    log_path = folder / "server.log"
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--model", tiny_checkpoint, "--device", "cpu"]
    command += ["--port", str(port), "--context-parallel", "2", "--state-dir", str(folder / "state"), *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT
        )
    server = RankedServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until(
            lambda: server_ready(server.url) or process.poll() is not None, timeout=120, what="ranks ready"
        )
        assert process.poll() is None, log_path.read_text()
        yield server
    finally:
        left = server.ranks if process.poll() is None else []
        process.kill()
        process.wait(10)
        for rank in left:
            rank.kill()


def in_flight(url: str) -> bool:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
    return any(line == "octoflux_jobs_in_flight 1.0" for line in metrics)


def half_mask() -> Image.Image:
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (256, 0, 512, 512))
    return mask


REQUESTS = {
    "text2img": {},
    "img2img": {"init_image": image_to_b64(INIT), "strength": 0.7},
    "inpaint": {"init_image": image_to_b64(INIT), "mask_image": image_to_b64(half_mask())},
    "lora": {"loras": {"style": 1.0}},
    "batch of 3": {"num_images": 3},
}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cp-loras")
    save_diffusers(make_lora(21), folder / "style.safetensors")
    return folder


@pytest.fixture(scope="module")
def models(tiny_checkpoint) -> str:
    """dev and schnell side by side: one server start covers both families."""
    return f"flux-dev={tiny_checkpoint},flux-schnell=tiny-schnell"


@pytest.fixture(scope="module")
def ranked(models, tmp_path_factory, lora_dir) -> Iterator[RankedServer]:
    folder = tmp_path_factory.mktemp("cp-server")
    flags = ("--lora-dir", str(lora_dir), "--tiny-dir", str(folder / "tiny"), "--warmup-steps", "1")
    with serve_ranked(models, folder, *flags, "--context-parallel-timeout", "30") as server:
        yield server


@pytest.fixture(scope="module")
def alone(server_factory, models, lora_dir, tmp_path_factory):
    """The same models in one process: the pixels the ranks must give."""
    from octoflux.app import build_models

    tiny_dir = tmp_path_factory.mktemp("alone") / "tiny"
    overrides = dict(model=models, tiny_dir=tiny_dir, lora_dir=lora_dir, warmup=False)
    with server_factory(engine_factory=build_models, **overrides) as live:
        yield live


def generate(url: str, **fields) -> list[np.ndarray]:
    """Through the OctoAI SDK, as users call it."""
    from conftest import LiveServer

    client = LiveServer(url=url, app=None, settings=None).client()
    request = {"prompt": "a red fox", "width": 512, "height": 512, "steps": STEPS, "seed": 7, **fields}
    response = client.image_gen.generate_flux_dev(**request)
    return [pixels(b64_to_image(item.image_b64)) for item in response.images]


def assert_same_pixels(split: list[np.ndarray], whole: list[np.ndarray]) -> None:
    assert len(split) == len(whole)
    for ours, theirs in zip(split, whole, strict=True):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= TOLERANCE


@pytest.mark.parametrize("request_kind", REQUESTS)
def test_two_ranks_give_the_pixels_of_one_process(ranked, alone, request_kind):
    assert_same_pixels(
        generate(ranked.url, **REQUESTS[request_kind]), generate(alone.url, **REQUESTS[request_kind])
    )


def test_schnell_on_two_ranks_gives_the_pixels_of_one_process(ranked, alone):
    def schnell(url: str) -> np.ndarray:
        from conftest import LiveServer

        client = LiveServer(url=url, app=None, settings=None).client()
        response = client.image_gen.generate_flux_schnell(prompt="a fox", width=512, height=512, seed=3)
        return pixels(b64_to_image(response.images[0].image_b64))

    assert_same_pixels([schnell(ranked.url)], [schnell(alone.url)])


def test_the_lora_is_active_on_every_rank(ranked):
    # Ranks without the adapter would give neither one process's LoRA pixels nor these.
    (styled,) = generate(ranked.url, loras={"style": 1.0})
    (plain,) = generate(ranked.url)
    assert np.abs(styled.astype(int) - plain.astype(int)).mean() > 2


def test_cancel_stops_every_rank_and_the_next_job_runs(ranked, alone):
    with httpx.Client(timeout=WAIT) as client:
        job = client.post(f"{ranked.url}{URL_PATH}", json=body("long", steps=200), headers=ASYNC).json()
        wait_until(lambda: in_flight(ranked.url), what="the long job to run")
        assert client.delete(job["poll_url"]).json()["status"] == "cancelled"
        wait_until(lambda: not in_flight(ranked.url), what="the ranks to stop")
    # A rank still denoising the cancelled job would pair its collectives with this job's.
    assert_same_pixels(generate(ranked.url), generate(alone.url))


def test_progress_and_previews_stream_from_the_ranks(ranked):
    with httpx.Client(timeout=WAIT) as client:
        job = client.post(f"{ranked.url}{URL_PATH}", json=body("watched", steps=12), headers=ASYNC).json()
        with connect_sse(client, "GET", f"{job['poll_url']}/events", params={"preview": "1"}) as source:
            events = [(sse.event, sse.json()) for sse in source.iter_sse()]
    assert events[-1][0] == "completed", events[-1]
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == list(range(steps[0], 13)), steps  # every step from the first one seen, to the last
    previews = [data for name, data in events if name == "preview"]
    assert previews and all(p["step"] % 4 == 0 for p in previews)
    image = Image.open(io.BytesIO(base64.b64decode(previews[-1]["image"].partition(",")[2])))
    assert image.format == "JPEG" and image.size == (256, 256)  # the longest side of a preview is 256


def test_sigterm_stops_every_rank(ranked):
    ranks = ranked.ranks
    assert len(ranks) == 1
    ranked.process.send_signal(signal.SIGTERM)
    assert ranked.process.wait(WAIT) == 0
    psutil.wait_procs(ranks, timeout=5)
    assert not [rank for rank in ranks if rank.is_running()]


def _lose_rank_mid_job(server: RankedServer, fault: signal.Signals) -> tuple[httpx.Response, float]:
    (rank,) = server.ranks
    results: dict = {}
    request = post_in_thread(server.url, body("long", steps=200), results, "long", timeout=60)
    wait_until(lambda: in_flight(server.url), what="the long job to run")
    os.kill(rank.pid, fault)
    sent = time.monotonic()
    request.join(60)
    waited = time.monotonic() - sent
    assert server.process.wait(WAIT) != 0
    psutil.wait_procs([rank], timeout=5)
    assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE
    return results["long"], waited


def _error_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " ERROR " in line]


def test_a_killed_rank_fails_the_job_with_503_and_the_server_exits(tiny_checkpoint, tmp_path):
    with serve_ranked(tiny_checkpoint, tmp_path, "--no-warmup") as server:
        response, waited = _lose_rank_mid_job(server, signal.SIGKILL)
    assert response.status_code == 503, response.text
    assert "context-parallel rank 1 was killed by SIGKILL" in response.json()["detail"]
    assert waited < 10  # seconds, not the collective timeout (60 s)
    assert _error_lines(server.log) == [_error_lines(server.log)[0]]
    assert "rank 1 was killed by SIGKILL; stopping" in _error_lines(server.log)[0]


def test_a_stalled_rank_ends_the_same_way_within_the_collective_timeout(tiny_checkpoint, tmp_path):
    flags = ("--no-warmup", "--context-parallel-timeout", "3")
    with serve_ranked(tiny_checkpoint, tmp_path, *flags) as server:
        response, _ = _lose_rank_mid_job(server, signal.SIGSTOP)
    assert response.status_code == 503, response.text
    assert "context-parallel ranks lost" in response.json()["detail"]
    (line,) = _error_lines(server.log)
    assert "Timed out" in line


def test_a_degree_that_does_not_divide_the_heads_is_a_one_line_startup_error(
    tiny_checkpoint, tmp_path, capsys
):
    settings = Settings(model=tiny_checkpoint, device="cpu", context_parallel="3", state_dir=tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli._context_parallel_layout(settings)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "octoflux: --context-parallel: ulysses=3 does not divide the model's 2 attention heads; valid: 2"
    ]


def test_offloading_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    settings = Settings(model=tiny_checkpoint, context_parallel="2", offload="model", state_dir=tmp_path)
    with pytest.raises(SystemExit):
        cli._context_parallel_layout(settings)
    (line,) = capsys.readouterr().err.splitlines()
    assert "does not combine with --offload" in line


def test_each_ray_replica_holds_the_gpus_of_all_its_ranks():
    pytest.importorskip("ray.serve")
    from octoflux.deploy.replicas import deployment_options, replica_count

    settings = Settings(device="cuda", replicas="auto", context_parallel="2")
    options = deployment_options(settings, replica_count(settings, gpus=8))
    assert options["num_replicas"] == 4 and options["ray_actor_options"] == {"num_gpus": 2}
    on_cpu = Settings(device="cpu", replicas="1", max_replicas=1, context_parallel="2")
    assert deployment_options(on_cpu, 1)["ray_actor_options"] == {"num_cpus": 2}
    with pytest.raises(SystemExit, match="fewer than 2 GPUs"):
        replica_count(settings, gpus=1)
