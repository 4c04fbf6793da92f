"""A real tiny-model engine whose timing tests control with events instead of sleeps.

`control.hold(prompt)` parks that prompt's job at its first denoising-step callback (so it is
genuinely mid-generation) until the returned event is set; `control.steps[prompt]` counts the
step callbacks it reached; `control.fault` is installed as the engine's `fault_hook`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

from pipelines.engine import GenerationSpec
from server.app import build_engine

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

    def factory(self, settings):
        engine = build_engine(settings)
        original_generate = engine.generate
        original_free = engine._free_memory

        def generate(spec: GenerationSpec, should_stop=lambda: False):
            self.ran.append(spec.prompt)

            def step_callback() -> bool:
                self.steps[spec.prompt] += 1
                self.reached[spec.prompt].set()
                gate = self.gates.get(spec.prompt)
                if gate is not None and not gate.wait(WAIT):
                    raise RuntimeError(f"test gate for {spec.prompt!r} never opened")
                return should_stop()

            return original_generate(spec, should_stop=step_callback)

        def free_memory() -> None:
            self.memory_freed += 1
            original_free()

        def fault_hook(spec: GenerationSpec) -> None:
            if self.fault is not None:
                self.fault(spec)

        engine.generate = generate
        engine._free_memory = free_memory
        engine.fault_hook = fault_hook
        return engine


def wait_until(condition: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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
