"""The server inside this process: uvicorn in a thread on a free loopback port (benchmarks, tests)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from octoflux.settings import Settings

READY_TIMEOUT_S = 120.0


@contextmanager
def serve_in_thread(
    settings: Settings,
    engine_factory: Callable[..., Any] | None = None,
    *,
    wait_ready: bool = True,
    timeout: float = READY_TIMEOUT_S,
) -> Iterator[tuple[str, Any]]:
    """Yield `(url, app)` for `create_app(settings, engine_factory)` served on 127.0.0.1.

    The socket is bound before uvicorn starts (port 0: the kernel picks a free one), so there is
    no window in which another process can take the port. With `wait_ready` this returns once
    `/readyz` answers 200 (the engine loaded and warmed); otherwise once uvicorn listens.
    """
    import uvicorn

    from octoflux.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = settings.model_copy(update=dict(host="127.0.0.1", port=port))
    app = (
        create_app(settings)
        if engine_factory is None
        else create_app(settings, engine_factory=engine_factory)
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(server, thread, url, wait_ready, time.monotonic() + timeout)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _wait(server, thread: threading.Thread, url: str, wait_ready: bool, deadline: float) -> None:
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("embedded server did not start")
        time.sleep(0.02)
    if not wait_ready:
        return
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"embedded server at {url} did not become ready")
        time.sleep(0.05)
