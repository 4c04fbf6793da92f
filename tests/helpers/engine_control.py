"""A real tiny-model engine whose timing tests control with events instead of sleeps.

`control.hold(prompt)` parks that prompt's job at its first denoising-step callback (so it is
genuinely mid-generation) until the returned event is set; `control.steps[prompt]` counts the
step callbacks it reached; `control.fault(spec)` runs before every pipeline call (each batch),
injected by wrapping the engine's pipelines, so a raise there is a failure inside the pipeline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import TypeVar

from octoflux.app import build_engine
from octoflux.pipelines.engine import GenerationSpec

T = TypeVar("T")
WAIT = 30  # seconds any test waits for an event before failing instead of hanging


class EngineControl:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.reached: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.steps: Counter[str] = Counter()
        self.ran: list[str] = []
        self.fault: Callable[[GenerationSpec], None] | None = None
        self.memory_freed = 0

    def hold(self, prompt: str) -> threading.Event:
        gate = self.gates[prompt] = threading.Event()
        return gate

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def factory(self, settings, library=None):
        engine = build_engine(settings, library)
        original_generate = engine.generate
        original_free = engine.free_memory

        def generate(spec: GenerationSpec, should_stop=lambda: False, on_step=None):
            self.ran.append(spec.prompt)

            def step_callback() -> bool:
                self.steps[spec.prompt] += 1
                self.reached[spec.prompt].set()
                gate = self.gates.get(spec.prompt)
                if gate is not None and not gate.wait(WAIT):
                    raise RuntimeError(f"test gate for {spec.prompt!r} never opened")
                return should_stop()

            return original_generate(spec, should_stop=step_callback, on_step=on_step)

        def free_memory() -> None:
            self.memory_freed += 1
            original_free()

        def fault(spec: GenerationSpec) -> None:
            if self.fault is not None:
                self.fault(spec)

        engine.generate = generate
        engine.free_memory = free_memory
        wrap_pipelines(engine, fault)
        return engine


class FaultyPipeline:
    """A pipeline that runs `before(spec)` ahead of each call, then the real pipeline."""

    def __init__(self, pipe, before: Callable[[GenerationSpec], None], current: list):
        self._pipe, self._before, self._current = pipe, before, current

    def __call__(self, **kwargs):
        self._before(self._current[0])
        return self._pipe(**kwargs)

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)


def wrap_pipelines(engine, before: Callable[[GenerationSpec], None]) -> None:
    """Run `before(spec)` ahead of every pipeline call (every batch) of `engine` (of each engine of a
    `ModelSet`)."""
    for one in getattr(engine, "engines", {}).values():
        wrap_pipelines(one, before)
    if hasattr(engine, "engines"):
        return
    current: list = [None]
    generate = engine.generate

    def remember(spec, *args, **kwargs):
        current[0] = spec
        return generate(spec, *args, **kwargs)

    engine.generate = remember
    for attr in ("pipe", "img2img", "inpaint"):
        setattr(engine, attr, FaultyPipeline(getattr(engine, attr), before, current))


def wait_until(
    condition: Callable[[], T], timeout: float = WAIT, what: str = "condition", every: float = 0.02
) -> T:
    """Poll `condition` every `every` seconds until it is truthy and return that value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
    return value


def open_raw_request(
    url: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> socket.socket:
    """Send a POST over a bare socket and return it unread: closing it is a client disconnect."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock
