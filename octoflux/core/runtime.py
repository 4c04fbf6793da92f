"""The model's life in this process: load in the background, warm up, ready, drain.

`Runtime` owns the engine and the job queue's worker; everything that takes work asks it
`check_accepting()` first. Warm-up runs before `/readyz` turns 200, so no user request pays a compile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from octoflux.core.engine_factory import EngineFactory
from octoflux.core.errors import NotReady, ShuttingDown
from octoflux.core.models import configured_models
from octoflux.core.queue import JobQueue
from octoflux.pipelines.engine import Engine
from octoflux.pipelines.family import FAMILIES, Family
from octoflux.pipelines.loras import LoraCache, LoraLibrary
from octoflux.pipelines.model_set import ModelSet
from octoflux.pipelines.warmup import WarmupReport
from octoflux.pipelines.warmup import warm_up as warm_up_engine
from octoflux.settings import Settings

log = logging.getLogger(__name__)

LOADING_RETRY_AFTER = 5


@dataclass(frozen=True)
class Readiness:
    ready: bool
    status: str  # "ready", "loading", "load failed", "shutting down"
    detail: str | None = None


def warm_up(engine: Engine, settings: Settings, jobs: JobQueue) -> WarmupReport:
    """`--warmup-sizes`, `--warmup-batches`, `--warmup-steps` (nothing with `--no-warmup`).

    One text-to-image timing that compiled nothing seeds the throughput estimate behind Retry-After.
    """
    if not settings.warmup:
        return WarmupReport()
    report = warm_up_engine(
        engine,
        settings.warmup_size_list,
        settings.warmup_batch_list,
        settings.warmup_steps,
        modes=engine.family_info.modes,  # schnell: text-to-image only; Kontext: edit; Fill: inpaint
    )
    if report.throughput_spec is not None and report.throughput_seconds is not None:
        jobs.observe(report.throughput_spec, report.throughput_seconds)
    return report


class Runtime:
    def __init__(
        self, settings: Settings, jobs: JobQueue, library: LoraLibrary, engine_factory: EngineFactory
    ):
        self.settings = settings
        self.jobs = jobs
        self.library = library
        self._engine_factory = engine_factory
        self.models: ModelSet | None = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._draining = threading.Event()

    @property
    def engine(self) -> Engine | None:
        """The first model served (the only one, unless `--model` names several)."""
        return self.models.default if self.models is not None else None

    def load(self) -> None:
        """Build every model, warm each up and start the worker; raises when a model cannot load."""
        built = self._engine_factory(self.settings, self.library)
        models = built if isinstance(built, ModelSet) else ModelSet.of(built)
        for engine in models.engines.values():
            warm_up(engine, self.settings, self.jobs)
        self.models = models
        self.jobs.start(models)
        if not self._draining.is_set():  # a SIGTERM during loading wins
            self._ready.set()

    def load_in_background(self, on_failure: Callable[[str], None] | None = None) -> threading.Thread:
        """Load on a thread; a failure is kept in `load_error` and handed to `on_failure`."""

        def run() -> None:
            try:
                self.load()
            except Exception as exc:
                self.load_error = f"model load failed: {exc}"
                log.error("%s", self.load_error)
                log.debug("model load traceback", exc_info=True)
                if on_failure is not None:
                    on_failure(self.load_error)

        thread = threading.Thread(target=run, name="octoflux-load", daemon=True)
        thread.start()
        return thread

    def readiness(self) -> Readiness:
        if self._draining.is_set():
            return Readiness(False, "shutting down", "draining")
        if self._ready.is_set():
            return Readiness(True, "ready")
        if self.load_error:
            return Readiness(False, "load failed", self.load_error)
        return Readiness(False, "loading", "loading model")

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def drain(self) -> None:
        """Readiness off first, then refuse new work, fail the queue, and wait for the running job."""
        self._draining.set()
        self._ready.clear()
        self.jobs.drain(self.settings.shutdown_timeout)

    def check_accepting(self) -> None:
        """`ShuttingDown` or `NotReady` unless new work can be taken."""
        if self._draining.is_set():
            raise ShuttingDown()
        if not self._ready.is_set():
            if self.load_error:  # retrying will not help: say why, without Retry-After
                raise NotReady(self.load_error)
            raise NotReady("model is still loading", retry_after=LOADING_RETRY_AFTER)

    @property
    def families(self) -> dict[str, Family] | None:
        """What this server serves, by model id, in `--model`'s order: the loaded models, or those its
        settings name (None: not known until the models have loaded)."""
        if self.models is not None:
            return self.models.families
        if self._configured_models is None:
            return None
        return {model_id: FAMILIES[model_id] for model_id in self._configured_models}

    @property
    def family(self) -> Family | None:
        """The first model served (None: not known until loaded)."""
        families = self.families
        return next(iter(families.values())) if families else None

    @cached_property
    def _configured_models(self) -> list[str] | None:
        return configured_models(self.settings.model)

    def served_families(self) -> dict[str, Family]:
        """The served models; `NotReady` (or why loading failed) while they are not known yet."""
        families = self.families
        if families is None:
            self.check_accepting()
            raise NotReady("model is still loading", retry_after=LOADING_RETRY_AFTER)
        return families

    def served_family(self) -> Family:
        """The first served model; `NotReady` (or why loading failed) while that is not known yet."""
        return next(iter(self.served_families().values()))

    def loaded_loras(self) -> dict[str, LoraCache]:
        """Each served model's LoRA cache, which an uploaded LoRA is checked against (models serving no
        LoRAs are left out); `NotReady` while the models load."""
        if not self._ready.is_set() or self.models is None:
            raise NotReady("model is still loading; LoRAs are checked against it", retry_after=5)
        engines = self.models.engines.items()
        return {model_id: engine.loras for model_id, engine in engines if engine.loras is not None}
