"""Short-lived links to generated images (OpenAI's `response_format: "url"`), kept in this process.

A link is an unguessable token that maps to (job id, image index) until it expires, like a
presigned URL: whoever holds it may fetch the image without the API key.

`put_link` / `get_link` have the signatures of the shared state store's (`StateStore.put_link`,
`StateStore.get_link`), so the token table can move there for links that every replica serves;
the encoded images then move beside the job's stored body. Until that swap the images live here,
in memory, dropped at expiry or oldest first past `max_bytes` (a dropped link reads as expired).
Used only from the event loop thread, so it needs no lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredImages:
    images: list[bytes]
    media_type: str
    expires_at: float  # time.time()

    @property
    def size(self) -> int:
        return sum(len(image) for image in self.images)


class ResultLinks:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._jobs: OrderedDict[str, StoredImages] = OrderedDict()  # oldest first
        self._links: dict[str, tuple[str, int, float]] = {}
        self.memory_bytes = 0

    # ----------------------------------------------------------- the state store's two link methods

    def put_link(self, token: str, job_id: str, index: int, expires_at: float) -> None:
        self._links[token] = (job_id, index, expires_at)

    def get_link(self, token: str, now: float | None = None) -> tuple[str, int] | None:
        self.sweep(now)
        found = self._links.get(token)
        return None if found is None else (found[0], found[1])

    # ----------------------------------------------------------- the images the links point at

    def put_images(self, job_id: str, images: list[bytes], media_type: str, expires_at: float) -> None:
        stored = StoredImages(images, media_type, expires_at)
        self._drop(job_id)
        self._jobs[job_id] = stored
        self.memory_bytes += stored.size
        while self.memory_bytes > self.max_bytes and len(self._jobs) > 1:
            self._drop(next(iter(self._jobs)))

    def get_image(self, job_id: str, index: int) -> tuple[bytes, str] | None:
        stored = self._jobs.get(job_id)
        if stored is None or not 0 <= index < len(stored.images):
            return None
        return stored.images[index], stored.media_type

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for token in [t for t, (_, _, expires_at) in self._links.items() if expires_at <= now]:
            del self._links[token]
        for job_id in [j for j, stored in self._jobs.items() if stored.expires_at <= now]:
            self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        stored = self._jobs.pop(job_id, None)
        if stored is not None:
            self.memory_bytes -= stored.size
