"""`GenerationService`: the server minus HTTP, built once per process (or replica) from the settings.

It wires the parts and owns their lifecycle; each part owns one job:
`runtime` (load, warm-up, ready, drain), `generation` (prepare and run a request), `async_jobs`
(the async lifecycle and its webhooks), `links` (keyless result links), `assets` (the asset API).
Routes of every dialect call these parts with what the request gave them; nothing here reads an
HTTP request, builds a response or touches torch.
"""

from __future__ import annotations

import asyncio
import uuid

from octoflux.assets.service import AssetService
from octoflux.assets.store import AssetStore
from octoflux.core.async_jobs import AsyncJobs
from octoflux.core.engine_factory import EngineFactory, build_models
from octoflux.core.generation import Generation
from octoflux.core.links import ResultLinks
from octoflux.core.queue import JobQueue
from octoflux.core.quotas import Quotas
from octoflux.core.runtime import Runtime
from octoflux.core.spec import ImageLimits
from octoflux.core.tenants import KeyTable
from octoflux.pipelines.loras import LoraLibrary
from octoflux.settings import Settings
from octoflux.state.store import open_state_store
from octoflux.webhooks.dispatcher import WebhookDispatcher

# Seconds close() gives async jobs that finished generating to store their outcome.
SETTLE_S = 5


class GenerationService:
    def __init__(self, settings: Settings, engine_factory: EngineFactory = build_models):
        self.settings = settings
        self.replica = uuid.uuid4().hex[:12]
        self.keys = KeyTable(settings.api_key_list, settings.api_keys_file)
        self.quotas = Quotas()
        self.jobs = JobQueue(settings.max_queue)
        self.library = LoraLibrary(settings.lora_dir)
        self.limits = ImageLimits(int(settings.max_image_mb * 2**20), settings.max_image_pixels)
        self.runtime = Runtime(settings, self.jobs, self.library, engine_factory)
        self.generation = Generation(self.runtime, self.jobs, settings.request_timeout)
        self.state = open_state_store(settings.resolved_state_url)
        self.links = ResultLinks(self.state, settings.result_ttl)
        self.assets = AssetService(
            AssetStore(self.library, settings.lora_upload_ttl_s, self.state),
            settings.max_lora_mb,
            lora_caches=self.runtime.loaded_loras,
        )
        # Sends from the shared store: deliveries survive a restart, and any live replica sends them.
        self.webhooks = (
            WebhookDispatcher(
                self.state,
                settings.webhook_secret,
                retries=settings.webhook_retries,
                allow_private=settings.webhook_allow_private,
            )
            if settings.webhook_secret
            else None
        )
        self.async_jobs = AsyncJobs(
            self.state,
            self.replica,
            settings.result_ttl,
            runtime=self.runtime,
            jobs=self.jobs,
            webhooks=self.webhooks,
            webhook_allow_private=settings.webhook_allow_private,
            max_attempts=settings.max_attempts,
            lease_s=settings.lease_timeout,
        )
        self.async_jobs.heartbeat()  # re-queues at once what a stopped process left leased

    # The runtime's state, as probes, the CLI and tests ask for it.

    @property
    def engine(self):
        return self.runtime.engine

    @property
    def family(self):
        return self.runtime.family

    @property
    def load_error(self) -> str | None:
        return self.runtime.load_error

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    def readiness(self):
        return self.runtime.readiness()

    def wait_ready(self, timeout: float) -> bool:
        return self.runtime.wait_ready(timeout)

    def check_accepting(self) -> None:
        self.runtime.check_accepting()

    def load(self) -> None:
        self.runtime.load()

    def load_in_background(self, on_failure=None):
        return self.runtime.load_in_background(on_failure)

    def drain(self) -> None:
        self.runtime.drain()

    async def events(self, response_id: str, owner: str | None, **options):
        """An async job's live events (see `AsyncJobs.events`)."""
        return await self.async_jobs.events(response_id, owner, **options)

    # ------------------------------------------------------------------ lifecycle

    def start(self, on_load_failure=None) -> asyncio.Task:
        """Load the model in the background, start sending webhooks, keep the shared state; returns the
        state keeper's task (cancelled by `close`)."""
        self.runtime.load_in_background(on_load_failure)
        if self.webhooks is not None:
            self.webhooks.start()
        self._keeper = asyncio.ensure_future(self.async_jobs.keep_state())
        return self._keeper

    async def close(self) -> None:
        keeper = getattr(self, "_keeper", None)
        if keeper is not None:
            keeper.cancel()
        await asyncio.to_thread(self.runtime.drain)
        await self.async_jobs.settle(SETTLE_S)
        if self.webhooks is not None:  # what it has not sent waits in the store for the next process
            await asyncio.to_thread(self.webhooks.stop)
        self.state.close()
