"""A webhook receiver on a loopback port, shared by the dispatcher tests and the end-to-end tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from octoflux.state.records import Delivery


class Receiver:
    """A webhook receiver on a loopback port; /hook/{behaviour} answers as the name says."""

    def __init__(self):
        self.calls: list[dict] = []
        self.counts: dict[tuple, int] = defaultdict(int)
        self.streamed_bytes = 0
        self.app = Starlette(routes=[Route("/hook/{behaviour}", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        behaviour = request.path_params["behaviour"]
        body = await request.body()
        message = (behaviour, request.headers.get("webhook-id"))
        self.counts[message] += 1
        self.calls.append({"behaviour": behaviour, "headers": dict(request.headers), "body": body})
        if behaviour == "fail-once" and self.counts[message] == 1:
            return Response("try again", status_code=500)
        if behaviour == "always-500":
            return Response("broken", status_code=500)
        if behaviour == "redirect":
            return Response(status_code=302, headers={"location": "/hook/redirect-target"})
        if behaviour == "slow":
            await asyncio.sleep(2.0)
        if behaviour == "huge":
            return StreamingResponse(self._endless(), media_type="application/octet-stream")
        return Response("ok")

    async def _endless(self):
        chunk = b"x" * 65536
        while True:  # only a client that stops reading ends this
            self.streamed_bytes += len(chunk)
            yield chunk
            await asyncio.sleep(0)

    def bodies(self, behaviour: str) -> list[dict]:
        return [call for call in self.calls if call["behaviour"] == behaviour]

    def wait_for(self, behaviour: str, count: int = 1, timeout: float = 30.0) -> list[dict]:
        """The calls to /hook/{behaviour}, once there are at least `count` of them."""
        deadline = time.monotonic() + timeout
        while len(calls := self.bodies(behaviour)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(calls)} of {count} webhook calls to /hook/{behaviour} arrived")
            time.sleep(0.02)
        return calls


def wait_final(outbox, delivery_id: str, timeout: float = 15.0) -> Delivery:
    """The outbox record (any store with `get_delivery`) once the dispatcher has written the outcome:
    delivered or failed. A receiver sees a call before the dispatcher records how it went."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivery = outbox.get_delivery(delivery_id)
        if delivery and delivery.status != "pending":
            return delivery
        time.sleep(0.02)
    raise AssertionError(f"delivery {delivery_id} still pending: {outbox.get_delivery(delivery_id)}")


def serve_in_thread(app, **ssl_files) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", **ssl_files)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    return server, thread, port


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    """A `Receiver` served on 127.0.0.1; `receiver.base` is its URL."""
    receiver = Receiver()
    server, thread, port = serve_in_thread(receiver.app)
    receiver.base = f"http://127.0.0.1:{port}"
    receiver.port = port
    try:
        yield receiver
    finally:
        server.should_exit = True
        thread.join(5)
