"""`AssetService`: OctoAI's LoRA asset API minus HTTP.

Records and state changes live in `AssetStore`; this adds what the routes need on top: streamed
uploads with `--max-lora-mb`, validation of a staged file against the LoRA shapes of the loaded
pipeline before it is published, and keeping blocking calls off the event loop. It raises the domain
errors of `octoflux/core/errors.py`. `space` is the caller's asset space (see `octoflux/assets/store.py`):
None for the shared one (an admin key, or a server without keys).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool

from octoflux.assets.store import AssetStore
from octoflux.core.errors import Conflict, NotFound, TooLarge, problem
from octoflux.pipelines.loras import LoraCache, LoraError, read_lora


class AssetService:
    """The asset API as coroutines whose store and file-system calls run in worker threads.

    A slow store (a SQLite lock held elsewhere) must not stall the event loop: the loop also runs
    the heartbeat that keeps this replica's jobs leased.
    """

    def __init__(
        self, store: AssetStore, max_lora_mb: float, lora_caches: Callable[[], dict[str, LoraCache]]
    ):
        """`lora_caches()` gives each served model's LoRA cache by model id (empty: no LoRAs are
        served), or raises `NotReady` while the models load."""
        self.store = store
        self.max_bytes = int(max_lora_mb * 2**20)
        self._lora_caches = lora_caches

    async def create(
        self, name: str, description: str, data: dict, space: str | None = None
    ) -> tuple[dict, str]:
        return await run_in_threadpool(self.store.create, name, description, data, space)

    async def all(self, space: str | None = None) -> list[dict]:
        return await run_in_threadpool(self.store.all, space)

    async def find(self, id_or_ref: str, space: str | None = None) -> dict:
        return await run_in_threadpool(self.store.find, id_or_ref, space)

    async def delete(self, asset_id: str, space: str | None = None) -> dict:
        try:
            return await run_in_threadpool(self.store.delete, asset_id, space)
        except LoraError:  # not even a valid name
            raise NotFound(f"no asset {asset_id!r}") from None

    async def upload(
        self, asset_id: str, token: str, chunks: AsyncIterator[bytes], declared_length: int | None
    ) -> int:
        """Stream a PUT body into staging; `TooLarge` past `--max-lora-mb` (the asset is rejected)."""
        await run_in_threadpool(self.store.authorize, asset_id, token)
        if declared_length is not None and declared_length > self.max_bytes:
            await run_in_threadpool(self.store.reject, asset_id, self._too_large())
            raise TooLarge(self._too_large())
        await run_in_threadpool(self.store.begin_upload, asset_id)
        try:
            return await self._receive(asset_id, chunks)
        except TooLarge as exc:
            await run_in_threadpool(self.store.reject, asset_id, exc.message)
            raise
        except BaseException:  # the client went away mid-body, or the server is stopping
            interrupted = "the upload was interrupted; PUT the file again"
            await run_in_threadpool(self.store.set_status, asset_id, "ready_to_upload", interrupted)
            raise

    async def _receive(self, asset_id: str, chunks: AsyncIterator[bytes]) -> int:
        """Stream the body to a temp file; it becomes the staged file only once complete."""
        temp = self.store.temp_file(asset_id)
        size = 0
        fh = await run_in_threadpool(temp.open, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise TooLarge(self._too_large())
                await run_in_threadpool(fh.write, chunk)
            await run_in_threadpool(self._stage, fh, asset_id, temp, size)
        finally:
            await run_in_threadpool(_discard, fh, temp)
        return size

    def _stage(self, fh: BinaryIO, asset_id: str, temp: Path, size: int) -> None:
        fh.close()
        self.store.finish_upload(asset_id, temp, size)

    async def file(self, asset_id: str, token: str) -> Path:
        """The published file a GET URL's token opens; `Conflict` until it is ready."""
        return await run_in_threadpool(self._ready_file, asset_id, token)

    def _ready_file(self, asset_id: str, token: str) -> Path:
        record = self.store.authorize(asset_id, token)
        path = self.store.library.path(record.name)
        if record.status != "ready" or not path.is_file():
            raise Conflict(f"asset {asset_id} is not ready")
        return path

    async def complete_upload(self, asset_id: str, space: str | None = None) -> str | None:
        """Check the staged file against the served models, then publish it; the reason if rejected."""
        await run_in_threadpool(self.store.accessible, asset_id, space, owned=True)
        caches = self._lora_caches()
        await run_in_threadpool(self.store.begin_validation, asset_id)
        try:
            await run_in_threadpool(self._validate_and_publish, asset_id, caches)
        except _Rejected as exc:  # the reason goes to status_details and to the answer
            await run_in_threadpool(self.store.reject, asset_id, str(exc))
            return str(exc)
        except (OSError, NotFound):
            raise Conflict(f"asset {asset_id} was deleted during validation") from None
        finally:
            await run_in_threadpool(self.store.end_validation, asset_id)
        return None

    def _validate_and_publish(self, asset_id: str, caches: dict[str, LoraCache]) -> None:
        """Published when it fits one served model (a Fill LoRA on a dev + Fill server); each generate
        call checks it again against the model it names."""
        if not caches:
            raise _Rejected("this server serves no LoRAs")
        record = self.store.record(asset_id)
        reasons: dict[str, str] = {}
        for model_id, cache in _distinct_shapes(caches).items():
            try:
                read_lora(self.store.staging_file(asset_id), record.name, cache.shapes, cache.max_bytes)
                break
            except LoraError as exc:
                reasons[model_id] = problem(exc).message
        else:
            if len(reasons) == 1:
                raise _Rejected(next(iter(reasons.values())))
            raise _Rejected("; ".join(f"on {model_id}: {reason}" for model_id, reason in reasons.items()))
        try:
            self.store.publish(asset_id)
        except Conflict as exc:
            raise _Rejected(exc.message) from None

    def _too_large(self) -> str:
        return f"the file exceeds the {self.max_bytes / 2**20:.4g} MB limit (--max-lora-mb)"


def _distinct_shapes(caches: dict[str, LoraCache]) -> dict[str, LoraCache]:
    """One cache per distinct set of layer shapes: Kontext has dev's, so a LoRA is read once for both."""
    distinct: dict[str, LoraCache] = {}
    for model_id, cache in caches.items():
        if all(cache.shapes != kept.shapes for kept in distinct.values()):
            distinct[model_id] = cache
    return distinct


def _discard(fh: BinaryIO, temp: Path) -> None:
    """Close and remove the temp file (a no-op once it was staged)."""
    fh.close()
    temp.unlink(missing_ok=True)


class _Rejected(Exception):
    """An uploaded file that cannot be a LoRA of this pipeline; the message says why."""
