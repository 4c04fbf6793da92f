"""`LoraCache`: the adapters resident on the one pipeline, least recently used evicted.

Touched only by the worker thread. It loads files as PEFT adapters (or into hot-swap slots when
the transformer is compiled), keeps the `cache_size` most recently used, and sets exactly the
adapters a request names before it runs (none at all when it names none). What it does is
counted in `stats` and reported to `on_event`, so the server can export metrics without this
layer knowing about them.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from octoflux.pipelines.loras import adapters
from octoflux.pipelines.loras.adapters import Adapter, file_fingerprint
from octoflux.pipelines.loras.files import (
    LoraError,
    LoraInvalid,
    LoraLibrary,
    LoraNotFound,
    ModuleShapes,
    file_sha256,
    linear_shapes,
    lora_key,
    not_found,
    read_lora,
    shown_name,
)
from octoflux.pipelines.loras.slots import LoraSlots

log = logging.getLogger(__name__)

# `on_event(name, seconds)`: "hit", "miss", "evict" (seconds None), "load", "switch" (seconds taken).
EventListener = Callable[[str, float | None], None]
EVENTS = ("hit", "miss", "evict", "load", "switch")


@dataclass
class LoraStats:
    """Counts and times of what the cache did; read by the server, tests and benchmarks."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    switches: int = 0
    switch_seconds: float = 0.0
    evictions: int = 0
    reloads: int = 0
    last_load_seconds: float = 0.0
    last_switch_seconds: float = 0.0
    events: list[str] = field(default_factory=list)  # the last few, newest last

    def note(self, event: str) -> None:
        self.events = [*self.events[-49:], event]

    def record(self, event: str, seconds: float | None) -> None:
        if event == "hit":
            self.hits += 1
        elif event == "miss":
            self.misses += 1
        elif event == "evict":
            self.evictions += 1
        elif event == "load":
            self.loads += 1
            self.load_seconds += seconds
            self.last_load_seconds = seconds
        elif event == "switch":
            self.switches += 1
            self.switch_seconds += seconds
            self.last_switch_seconds = seconds


class LoraCache:
    """Adapters resident on the pipeline, least recently used evicted; worker thread only."""

    def __init__(
        self,
        pipe,
        library: LoraLibrary,
        cache_size: int = 8,
        max_bytes: int = 2048 * 2**20,
        slots: int = 0,
        max_rank: int = 64,
        on_event: EventListener | None = None,
    ):
        self.pipe = pipe
        self.library = library
        self.cache_size = max(1, cache_size)
        self.max_bytes = max_bytes
        # Taken before any adapter wraps a layer; immutable, so any thread may validate with it.
        self.shapes: ModuleShapes = linear_shapes(pipe)
        self.stats = LoraStats()
        self._on_event = on_event
        self._resident: OrderedDict[str, Adapter] = OrderedDict()
        # None: unknown (after a load, eviction or failure PEFT may have changed it): set it afresh.
        self._active: tuple[tuple[str, float], ...] | None = None
        self._counter = 0
        # Slot mode (for a compiled transformer): create before compiling, see slots.py.
        self.slots = LoraSlots(pipe, self.shapes, slots, max_rank) if slots > 0 else None

    @property
    def resident(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        return list(self._resident)

    @property
    def text_encoder_key(self) -> tuple:
        """What the active LoRAs do to prompt embeddings; part of any prompt-embedding cache key."""
        return tuple(
            (self._resident[n].sha256, w)
            for n, w in self._active or ()
            if "text_encoder" in self._resident[n].components
        )

    def activate(self, loras: dict[str, float]) -> None:
        """Load what is missing or changed on disk, then make exactly these adapters active."""
        wanted: dict[str, float] = {}
        for ref, weight in loras.items():
            name = lora_key(ref)
            wanted[name] = wanted.get(name, 0.0) + weight
        if self.slots is not None and len(wanted) > len(self.slots.names):
            raise LoraInvalid(
                ",".join(wanted),
                f"{len(wanted)} LoRAs requested; this server applies at most {len(self.slots.names)} "
                "per request (--lora-slots, with a compiled transformer)",
            )
        for name in wanted:
            self._ensure(name)
        self._evict_beyond_capacity(keep=set(wanted))
        target = tuple(sorted(wanted.items()))
        if target == self._active:
            return
        started = time.perf_counter()
        self._set_active([(self._resident[n], w) for n, w in target])
        self._active = target
        seconds = self._record("switch", f"switch {[n for n, _ in target]}", started)
        log.debug("LoRA set %s active in %.1f ms", dict(target) or "{}", seconds * 1000)

    def evict(self, name: str) -> None:
        """Remove one resident LoRA from the pipeline (its next use reads the file again)."""
        self._evict(name, why="asked to")

    def _set_active(self, chosen: list[tuple[Adapter, float]]) -> None:
        names, weights = [e.adapter for e, _ in chosen], [w for _, w in chosen]
        if self.slots is None:
            adapters.activate(self.pipe.transformer, names, weights, is_text_encoder=False)
        else:
            try:
                self.slots.assign([(e, w) for e, w in chosen if "transformer" in e.components])
            except LoraError:
                self._active = None
                raise
        text_encoder = getattr(self.pipe, "text_encoder", None)
        if text_encoder is not None:
            adapters.activate(text_encoder, names, weights, is_text_encoder=True)

    def _ensure(self, name: str) -> Adapter:
        path = self.library.path(name)
        try:
            fingerprint = file_fingerprint(path)
        except FileNotFoundError:
            raise not_found(shown_name(name), path) from None
        entry = self._resident.get(name)
        if entry is not None:
            # Same mtime, size and inode; or touched but not changed.
            if entry.fingerprint == fingerprint or file_sha256(path) == entry.sha256:
                entry.fingerprint = fingerprint
                self._resident.move_to_end(name)
                self._record("hit")
                return entry
            self._evict(name, why="its file changed")
            self.stats.reloads += 1
        self._record("miss")
        return self._load(name, path, fingerprint)

    def _load(self, name: str, path: Path, fingerprint: tuple[int, int, int]) -> Adapter:
        started = time.perf_counter()
        shown = shown_name(name)
        try:
            lora = read_lora(path, shown, self.shapes, self.max_bytes)
        except FileNotFoundError:  # deleted between the request's check and now
            raise LoraNotFound(shown, f"unknown LoRA {shown!r}: {path.name} was removed") from None
        if self.slots is not None:
            self.slots.check(lora)
        self._counter += 1
        adapter = f"{re.sub(r'[^A-Za-z0-9_]', '_', name)[:48]}__{self._counter}"
        try:
            adapters.attach(self.pipe, lora, adapter, transformer=self.slots is None)
        except Exception as exc:
            self._active = None
            raise LoraInvalid(shown, f"LoRA {shown!r} could not be attached to the pipeline: {exc}") from exc
        entry = Adapter(name, adapter, fingerprint, lora.sha256, lora.components, lora.rank)
        if self.slots is not None:
            entry.lora = lora
        self._resident[name] = entry
        self._active = None
        seconds = self._record("load", f"load {name}", started)
        log.info(
            "loaded LoRA %r (rank %d, %s, %.2f MB) in %.1f ms",
            name,
            lora.rank,
            "+".join(lora.components),
            lora.size / 2**20,
            seconds * 1000,
        )
        return entry

    def _evict_beyond_capacity(self, keep: set[str]) -> None:
        for name in list(self._resident):
            if len(self._resident) <= self.cache_size:
                break
            if name not in keep:
                self._evict(name, why="least recently used")

    def _evict(self, name: str, why: str) -> None:
        entry = self._resident.pop(name)
        adapters.detach(self.pipe, entry.adapter)
        if self.slots is not None:
            self.slots.forget(entry)
        self._active = None  # PEFT re-activates a survivor when the active adapter is deleted
        self._record("evict", f"evict {name}")
        log.info("evicted LoRA %r (%s)", name, why)

    def _record(self, event: str, note: str | None = None, started: float | None = None) -> float | None:
        """Count `event` (timed from `started` when given) and tell `on_event`; returns the seconds."""
        seconds = None if started is None else time.perf_counter() - started
        self.stats.record(event, seconds)
        if note is not None:
            self.stats.note(note)
        if self._on_event is not None:
            self._on_event(event, seconds)
        return seconds
