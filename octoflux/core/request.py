"""What a dialect hands the core: the request in the core's terms, and who is asking.

Each API dialect (`octoflux/api/<dialect>/`) converts its wire request into an `ImageRequest`, with
images already decoded, and passes a `Caller` down once; the core never reads an HTTP request.
Field names here are the core's: a dialect renders `InvalidField.field` in its own words.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from octoflux.core.quotas import Quota
    from octoflux.core.tenants import Tenant


@dataclass(frozen=True)
class ImageRequest:
    """One generation request; `None` means the served model's default."""

    prompt: str
    num_images: int = 1
    # An int gives seed, seed+1, ... (wrapping past 2^32-1 to 1); a list gives one per image.
    seed: int | list[int | None] | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    strength: float | None = None
    loras: dict[str, float] = field(default_factory=dict)
    # Pixels to add on each side (left, right, top, bottom): outpainting, on FLUX.1-Fill-dev.
    outpaint: tuple[int, int, int, int] | None = None


@dataclass
class JobTrace:
    """What became of the job behind a request, filled in by the core for the caller's log line."""

    job_id: str | None = None
    queue_wait_ms: float | None = None
    gpu_ms: float | None = None
    encode_ms: float | None = None

    def fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Caller:
    """Who asks, handed down by the route: the core never climbs back up to the HTTP request."""

    request_id: str
    api: str  # the metrics label: "sync", "async" or the dialect ("openai")
    owner: str | None = None  # who may read an async result (a hash of the bearer token)
    tenant: Tenant | None = None  # the API key used; None when the server has no keys
    quota: Quota | None = None  # that key's limits in this process
    # Returns when the client has gone away (sync requests); None: never.
    client_gone: Callable[[], Awaitable[None]] | None = None
    trace: JobTrace = field(default_factory=JobTrace)
