"""Webhook delivery: the outbox protocol, the retry schedule, and the thread that sends.

Delivery is at least once. `WebhookDispatcher.enqueue` writes a `Delivery` to a durable outbox, the
state store (`octoflux.state.store.StateStore`: SQLite or Redis); a background thread running its
own asyncio loop claims due deliveries with a lease and POSTs them. A replica that dies mid-attempt
leaves its claims to expire, and whichever dispatcher polls the same store next sends them again
with the same `webhook-id`.

DNS rebinding: at every attempt the host is resolved once, every address is checked
(`urls.checked_address`), and the request goes to the checked address itself, with the original
Host header and TLS server name (SNI, and the certificate is verified against the original host).
A later answer from DNS never reaches the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import threading
import time
from typing import Protocol

import httpx
from standardwebhooks import Webhook

from octoflux.core import metrics
from octoflux.state.records import Delivery
from octoflux.webhooks.message import build_payload, message_id
from octoflux.webhooks.signing import check_webhook_secret, signature_headers
from octoflux.webhooks.urls import Resolver, WebhookUrlError, checked_address, resolve_host

log = logging.getLogger("octoflux.webhooks")


def retry_delay(attempt: int, base_s: float, jitter: float = 0.2) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base x 2^(attempt-1), ± jitter.

    With base 3 s and 5 retries: 3, 6, 12, 24, 48 s, 93 s in all before the last attempt.
    """
    return base_s * 2 ** (attempt - 1) * random.uniform(1 - jitter, 1 + jitter)


class DeliveryOutbox(Protocol):
    """Durable store of deliveries (the state store's delivery methods); used from the enqueueing
    thread and the dispatcher's thread."""

    def add_delivery(self, d: Delivery) -> None: ...

    def claim_due_deliveries(self, now: float, lease_s: float, limit: int) -> list[Delivery]: ...

    def update_delivery(
        self, delivery_id: str, *, attempts: int, next_attempt_at: float, status: str, last_error: str | None
    ) -> bool: ...

    def get_delivery(self, delivery_id: str) -> Delivery | None: ...


class WebhookDispatcher:
    """Sends deliveries from the outbox: one daemon thread with its own asyncio loop and HTTP client.

    Its own thread keeps slow receivers and outbox calls off the server's event loop, and lets
    `start()`/`stop()` be called from anywhere (app lifespan, a Ray replica, a test).
    """

    def __init__(
        self,
        outbox: DeliveryOutbox,
        secret: str,
        *,
        retries: int = 5,
        allow_private: bool = False,
        backoff_s: float = 3.0,
        jitter: float = 0.2,
        timeout_s: float = 10.0,
        max_response_bytes: int = 64 * 1024,
        poll_s: float = 1.0,
        lease_s: float = 60.0,
        batch_size: int = 16,
        resolve: Resolver = resolve_host,
        verify: ssl.SSLContext | bool = True,
    ):
        if not check_webhook_secret(secret):
            raise ValueError("webhooks need a signing secret (--webhook-secret)")
        self.outbox = outbox
        self._signer = Webhook(secret)
        self.retries = retries
        self.allow_private = allow_private
        self.backoff_s = backoff_s
        self.jitter = jitter
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.poll_s = poll_s
        # Longer than one attempt can take, so a live dispatcher's claim never expires under it.
        self.lease_s = max(lease_s, timeout_s * 2)
        self.batch_size = batch_size
        self.resolve = resolve
        self.verify = verify
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = threading.Event()

    def enqueue(
        self,
        job_id: str,
        event_type: str,
        status: str,
        response_url: str | None,
        error: str | None,
        url: str,
    ) -> Delivery:
        """Store the message durably and wake the sender; returns at once."""
        now = time.time()
        delivery = Delivery(
            id=message_id(job_id, event_type),
            job_id=job_id,
            url=url,
            payload=build_payload(event_type, job_id, status, response_url, error),
            created_at=now,
            next_attempt_at=now,
        )
        self.outbox.add_delivery(delivery)
        self._nudge()
        return delivery

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(ready)), name="octoflux-webhooks", daemon=True
        )
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the attempts in flight (up to `timeout`, default one attempt's timeout) and stop."""
        if self._thread is None:
            return
        self._stopping.set()
        self._nudge()
        self._thread.join(self.timeout_s + 1 if timeout is None else timeout)
        self._thread = None

    def _nudge(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(wake.set)

    def client(self) -> httpx.AsyncClient:
        # trust_env=False: a proxy from the environment would make the address check meaningless.
        # No keep-alive: a pooled connection is keyed by address, and must not carry a request
        # for one host over TLS set up (and verified) for another host on the same address.
        return httpx.AsyncClient(
            follow_redirects=False,
            timeout=self.timeout_s,
            verify=self.verify,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        ready.set()
        try:
            async with self.client() as client:
                while not self._stopping.is_set():
                    try:
                        await self.deliver_due(client)
                    except Exception:
                        log.exception("webhook dispatch pass failed")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_s)
                    self._wake.clear()
        finally:
            self._loop = None

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """One pass: claim what is due and attempt it concurrently; returns how many were attempted."""
        claimed = self.outbox.claim_due_deliveries(time.time(), self.lease_s, self.batch_size)
        await asyncio.gather(*(self.attempt(client, delivery) for delivery in claimed))
        return len(claimed)

    async def attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> str:
        """Send once, record the result in the outbox; returns the outcome label."""
        attempt = delivery.attempts + 1
        started = time.perf_counter()
        status_code: int | None = None
        response_bytes = 0
        error: str | None = None
        try:
            address = await asyncio.to_thread(checked_address, delivery.url, self.allow_private, self.resolve)
            status_code, response_bytes = await asyncio.wait_for(
                self._post(client, delivery, address), self.timeout_s
            )
            outcome = "delivered" if 200 <= status_code < 300 else "retry"
            if outcome == "retry":
                error = f"HTTP {status_code}"
        except WebhookUrlError as exc:
            outcome, error = "refused", str(exc)
        except TimeoutError:
            outcome, error = "retry", f"no answer within {self.timeout_s:g} s"
        except Exception as exc:  # refused connection, TLS, DNS failure, protocol error: all retried
            outcome, error = "retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        elapsed = time.perf_counter() - started
        if outcome == "retry" and attempt > self.retries:
            outcome = "failed"
        self._record(delivery, attempt, outcome, error)
        metrics.WEBHOOK_DELIVERIES.labels(outcome).inc()
        metrics.WEBHOOK_ATTEMPT_SECONDS.observe(elapsed)
        if outcome == "delivered":
            metrics.WEBHOOK_DELIVERY_SECONDS.observe(max(0.0, time.time() - delivery.created_at))
        line = {
            "event": "webhook_attempt",
            "id": delivery.id,
            "job": delivery.job_id,
            "attempt": attempt,
            "outcome": outcome,
            "status_code": status_code,
            "error": error,
            "response_bytes": response_bytes,
            "ms": round(elapsed * 1000, 1),
        }
        log.log(logging.INFO if outcome == "delivered" else logging.WARNING, json.dumps(line))
        return outcome

    def _record(self, delivery: Delivery, attempt: int, outcome: str, error: str | None) -> None:
        now = time.time()
        if outcome == "retry":
            status, next_at = "pending", now + retry_delay(attempt, self.backoff_s, self.jitter)
        else:
            status, next_at = ("delivered" if outcome == "delivered" else "failed"), now
        self.outbox.update_delivery(
            delivery.id, attempts=attempt, next_attempt_at=next_at, status=status, last_error=error
        )

    async def _post(self, client: httpx.AsyncClient, delivery: Delivery, address: str) -> tuple[int, int]:
        url = httpx.URL(delivery.url)
        headers = {
            "host": url.netloc.decode("ascii"),
            "content-type": "application/json",
            "user-agent": "octoflux-webhooks",
            # No compressed bodies: the size limit below counts bytes on the wire.
            "accept-encoding": "identity",
            **signature_headers(self._signer, delivery.id, int(time.time()), delivery.payload),
        }
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        pinned = url.copy_with(host=address)
        async with client.stream(
            "POST", pinned, content=delivery.payload, headers=headers, extensions=extensions
        ) as response:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= self.max_response_bytes:
                    break  # leaving the block closes the connection; the rest is never read
            return response.status_code, min(read, self.max_response_bytes)
