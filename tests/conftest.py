"""Shared fixtures: the tiny checkpoint on disk (once per test run) and live servers over real HTTP."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from octoflux.app import build_models  # noqa: E402
from octoflux.deploy.embedded import serve_in_thread  # noqa: E402
from octoflux.pipelines.tiny import write_tiny_checkpoint  # noqa: E402
from octoflux.settings import Settings  # noqa: E402

pytest_plugins = ["helpers.services"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n 2 --dist loadfile`: whole modules per worker, the slowest first (helpers/scheduling.py)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from helpers.scheduling import SlowestModulesFirst

    return SlowestModulesFirst(config, log)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny random-weight FLUX written in diffusers format, loaded like real weights."""
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="session")
def load_tiny(tiny_checkpoint) -> Callable[..., object]:
    """`load_tiny()`: a fresh tiny pipeline on the CPU, loaded from disk by the server's own loader.

    Fresh each call: tests attach LoRAs, compile or quantize it. `load_tiny(other_checkpoint)` loads
    another tiny checkpoint (schnell) the same way.
    """
    import torch

    from octoflux.pipelines.loader import load_flux_pipeline

    def load(checkpoint: str | None = None, dtype=None):
        return load_flux_pipeline(checkpoint or tiny_checkpoint, torch.device("cpu"), dtype or torch.float32)

    return load


@dataclass
class LiveServer:
    url: str
    app: object
    settings: Settings

    @property
    def service(self):
        return self.app.state.service

    def client(self, api_key: str = "test-key"):
        from octoai.client import OctoAI
        from octoai.environment import OctoAIEnvironment

        env = OctoAIEnvironment(default=self.url, image_gen=self.url, text_gen=self.url)
        return OctoAI(api_key=api_key, environment=env, timeout=120)


@contextmanager
def run_server(
    settings: Settings, engine_factory=build_models, wait_ready: bool = True
) -> Iterator[LiveServer]:
    """Serve `create_app(settings)` with uvicorn on a free loopback port in a thread."""
    with serve_in_thread(settings, engine_factory, wait_ready=wait_ready) as (url, app):
        yield LiveServer(url=url, app=app, settings=app.state.service.settings)


@pytest.fixture(scope="session")
def server_factory(tiny_checkpoint, tmp_path_factory) -> Callable[..., object]:
    """`with server_factory(max_queue=1, ...) as live:` starts a server with those settings."""

    def factory(engine_factory=build_models, wait_ready: bool = True, **overrides):
        values = dict(
            model=tiny_checkpoint,
            device="cpu",
            lora_dir=tmp_path_factory.mktemp("loras"),
            state_dir=tmp_path_factory.mktemp("state"),
            warmup_steps=1,
        )
        values.update(overrides)
        return run_server(Settings(**values), engine_factory=engine_factory, wait_ready=wait_ready)

    return factory


@pytest.fixture(scope="module")
def control():
    """One `EngineControl` per test module: holds the worker, counts steps, injects faults."""
    from helpers.engine_control import EngineControl

    return EngineControl()


@pytest.fixture
def controlled(control):
    """The control reset before a test and every gate opened after it (`usefixtures` it per module)."""
    control.reset()
    yield control
    control.release_all()


@pytest.fixture(scope="module")
def controlled_server(server_factory, control):
    """A server whose engine `control` drives, without warm-up."""
    with server_factory(engine_factory=control.factory, warmup=False) as live:
        yield live


@pytest.fixture(scope="session")
def live_server(server_factory) -> Iterator[LiveServer]:
    """One open (no API keys) server on the tiny model, shared by the read-only tests."""
    with server_factory() as live:
        yield live


@pytest.fixture(scope="session")
def sdk(live_server):
    return live_server.client()


def b64_to_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def image_to_b64(image: Image.Image, fmt: str = "PNG", **save_args) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def gradient_image(width: int, height: int) -> Image.Image:
    """A deterministic, non-uniform test picture."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.broadcast_to((x + y) / 2, (height, width, 1)),
        ],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8))
