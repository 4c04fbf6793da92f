"""Webhooks for finished async jobs: URL safety, Standard Webhooks signing, the payload, and delivery.

Delivery is at least once. `WebhookDispatcher.enqueue` writes a `Delivery` to a durable outbox
(the state store, or `SqliteOutbox`); a background thread running its own asyncio loop claims due
deliveries with a lease and POSTs them. A replica that dies mid-attempt leaves its claims to expire,
and whichever dispatcher polls the same outbox next sends them again with the same `webhook-id`.

DNS rebinding: at every attempt the host is resolved once, every address is checked, and the request
goes to the checked address itself, with the original Host header and TLS server name (SNI, and the
certificate is verified against the original host). A later answer from DNS never reaches the socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from octoflux.core import metrics
from octoflux.state.records import Delivery

log = logging.getLogger("octoflux.webhooks")

WEBHOOK_HEADER = "X-OctoFlux-Webhook-Url"
SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048
EVENT_TYPES = {
    "completed": "generation.completed",
    "failed": "generation.failed",
    "cancelled": "generation.cancelled",
}
# Addresses that hand out cloud credentials. The link-local and ULA ones are refused anyway; Alibaba's
# sits in 100.64/10 (shared address space), listed so the reason says what it is.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")

Resolver = Callable[[str, int], list[str]]


class WebhookUrlError(ValueError):
    """A webhook URL the server will not call; the message names the header it came from."""

    def __init__(self, reason: str):
        super().__init__(f"{WEBHOOK_HEADER}: {reason}")


# --- URL safety -------------------------------------------------------------------------------


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the host resolves to, in the resolver's order (blocking: call off the event loop)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_refusal(address: str) -> str | None:
    """Why a webhook may not be sent to this address, or None for a public unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in NAT64_PREFIX:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind in ("loopback", "link_local", "private", "unspecified", "multicast", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


def _valid_hostname(host: str) -> bool:
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.rstrip(".").split(".")
    return len(ascii_host) <= 253 and all(HOST_LABEL.match(label) for label in labels)


def parse_webhook_url(url: str) -> tuple[str, str, int]:
    """Syntax and scheme only: (scheme, host, port). Raises WebhookUrlError."""
    if not url or len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"must be an http or https URL of at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise WebhookUrlError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookUrlError("must be an http or https URL")
    host = parts.hostname or ""
    if not host:
        raise WebhookUrlError("has no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _valid_hostname(host):
            raise WebhookUrlError(f"host {host!r} is not a valid host name") from None
    return scheme, host, port or (443 if scheme == "https" else 80)


def checked_address(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> str:
    """Resolve the URL's host once and return the address to connect to.

    Raises WebhookUrlError for a bad URL or a refused address, OSError when the host does not resolve.
    """
    _, host, port = parse_webhook_url(url)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = resolve(host, port)
    if not addresses:
        raise OSError(f"{host} resolved to no address")
    if not allow_private:
        # Every record counts: a name answering one public and one private address is refused.
        for address in addresses:
            reason = address_refusal(address)
            if reason:
                raise WebhookUrlError(
                    f"host {host!r} resolves to {address}, {reason}; "
                    "private targets need --webhook-allow-private"
                )
    return addresses[0]


def check_webhook_url(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> str:
    """Submit-time check (blocking DNS: call it off the event loop); returns the URL to store."""
    url = url.strip()
    try:
        checked_address(url, allow_private, resolve)
    except OSError:
        host = urlsplit(url).hostname
        raise WebhookUrlError(f"host {host!r} does not resolve") from None
    return url


# --- Signing (Standard Webhooks) ----------------------------------------------------------------


def new_webhook_secret() -> str:
    """A fresh signing secret in the spec's format: whsec_ + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def check_webhook_secret(value: str) -> str:
    """'' (webhooks off) or whsec_ + base64 of 24 to 64 bytes; the error never repeats the value."""
    if not value:
        return value
    hint = "make one with: echo whsec_$(openssl rand -base64 32)"
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(f"--webhook-secret must start with {SECRET_PREFIX!r} (Standard Webhooks); {hint}")
    encoded = value[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"--webhook-secret: what follows {SECRET_PREFIX!r} is not base64; {hint}") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"--webhook-secret must decode to 24-64 bytes, not {len(key)}; {hint}")
    return value


def signature_headers(signer: Webhook, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature (v1, HMAC-SHA256 over id.timestamp.body)."""
    signature = signer.sign(message_id, datetime.fromtimestamp(timestamp, tz=UTC), body.decode("utf-8"))
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


# --- Payload ------------------------------------------------------------------------------------


def build_payload(
    event_type: str,
    response_id: str,
    status: str,
    response_url: str | None,
    error: str | None,
    now: datetime | None = None,
) -> bytes:
    """The exact JSON body signed and sent; no image bytes (the receiver fetches response_url)."""
    if event_type not in EVENT_TYPES.values():
        raise ValueError(f"unknown webhook event type {event_type!r}")
    when = (now or datetime.now(UTC)).astimezone(UTC)
    document = {
        "type": event_type,
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {"response_id": response_id, "status": status, "response_url": response_url, "error": error},
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def message_id(job_id: str, event_type: str) -> str:
    """One id per job and event: a second enqueue of the same event is the same message to receivers."""
    return "msg_" + hashlib.sha256(f"{job_id}\n{event_type}".encode()).hexdigest()[:32]


def retry_delay(attempt: int, base_s: float, jitter: float = 0.2) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base x 2^(attempt-1), ± jitter.

    With base 3 s and 5 retries: 3, 6, 12, 24, 48 s, 93 s in all before the last attempt.
    """
    return base_s * 2 ** (attempt - 1) * random.uniform(1 - jitter, 1 + jitter)


# --- Delivery -----------------------------------------------------------------------------------


class DeliveryOutbox(Protocol):
    """Durable store of deliveries; used from the enqueueing thread and the dispatcher's thread."""

    def add_delivery(self, d: Delivery) -> None: ...

    def claim_due_deliveries(self, now: float, lease_s: float, limit: int) -> list[Delivery]: ...

    def update_delivery(
        self, id: str, *, attempts: int, next_attempt_at: float, status: str, last_error: str | None
    ) -> None: ...

    def get_delivery(self, id: str) -> Delivery | None: ...


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
