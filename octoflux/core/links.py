"""Result links: an encoded image behind an unguessable token, readable without the API key until
`--result-ttl` passes (OpenAI's `response_format: "url"`). The images live in the state store's own
table, so every replica serves every link."""

from __future__ import annotations

import asyncio
import secrets
import time

from octoflux.core.errors import NotFound
from octoflux.state.store import StateStore


class ResultLinks:
    def __init__(self, store: StateStore, ttl_s: float):
        self.store = store
        self.ttl_s = ttl_s

    async def publish(self, images: list[bytes], media_type: str) -> list[str]:
        """One token per image, in order."""
        tokens = [secrets.token_urlsafe(32) for _ in images]
        expires_at = time.time() + self.ttl_s

        def put() -> None:
            for token, image in zip(tokens, images, strict=True):
                self.store.put_link(token, image, media_type, expires_at)

        await asyncio.to_thread(put)
        return tokens

    async def image(self, token: str) -> tuple[bytes, str]:
        """(image bytes, media type); `NotFound` for a wrong or expired link."""
        found = await asyncio.to_thread(self.store.get_link, token)
        if found is None:
            raise NotFound("no such image: the link is wrong or has expired")
        return found
