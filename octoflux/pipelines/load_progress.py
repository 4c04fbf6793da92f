"""Loading progress as log lines (never terminal bars): a file's GB read of GB every ~10% or 5 s, and a
line per component of a base folder as diffusers loads it."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
# A base folder's component lines, apart from a file's "X of Y GB read" lines.
component_log = logging.getLogger(f"{__name__}.components")
# A component line is INFO from this size or load time on, DEBUG below both.
NOTABLE_BYTES = 100 * 2**20
NOTABLE_SECONDS = 1.0

GB = 1e9
# A line at least every STEP_SHARE of the total, or every STEP_SECONDS, whichever comes first.
STEP_SHARE = 0.10
STEP_SECONDS = 5.0


class LoadProgress:
    """Counts the bytes of one component as they are read and logs how far it has got."""

    def __init__(self, component: str, total_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.component = component
        self.total = max(total_bytes, 1)
        self.done = 0
        self.clock = clock
        self.started = clock()
        self._last_time = self.started
        self._last_bytes = 0

    def advance(self, nbytes: int) -> None:
        self.done = min(self.done + nbytes, self.total)
        now = self.clock()
        if self.done - self._last_bytes >= STEP_SHARE * self.total or now - self._last_time >= STEP_SECONDS:
            self._report(now)

    def finish(self) -> None:
        self.done = self.total
        if self._last_bytes < self.total:
            self._report(self.clock())

    def _report(self, now: float) -> None:
        self._last_time, self._last_bytes = now, self.done
        log.info(
            "loading %s: %.2f of %.2f GB read (%d%%, %.1f s)",
            self.component,
            self.done / GB,
            self.total / GB,
            round(100 * self.done / self.total),
            now - self.started,
        )


# diffusers logs "Loaded NAME as CLASS from `NAME` subfolder of SOURCE." at INFO after each component
# it loads (components passed in are not logged); its own bar over the components is turned off.
PIPELINE_LOGGER = "diffusers.pipelines.pipeline_utils"
LOADED_RECORD = re.compile(r"^Loaded (\S+) as (\S+) from")


class ComponentProgress:
    """While `FluxPipeline.from_pretrained(source)` runs in this thread: a line per component it loads,
    with its size on disk and the seconds it took. diffusers has no hook inside one component (its
    shards are read by diffusers' and transformers' loaders), so the line comes when it is done."""

    _lock = threading.Lock()
    _users = 0
    _saved_level = logging.NOTSET
    _shown_level = logging.WARNING  # what the logger let through before
    _current = threading.local()

    def __init__(self, source: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.clock = clock
        self._last = clock()

    def __enter__(self) -> ComponentProgress:
        self._last = self.clock()
        ComponentProgress._current.tracker = self
        with ComponentProgress._lock:
            if ComponentProgress._users == 0:
                pipeline_log = logging.getLogger(PIPELINE_LOGGER)
                ComponentProgress._saved_level = pipeline_log.level
                ComponentProgress._shown_level = pipeline_log.getEffectiveLevel()
                pipeline_log.addFilter(_turn_loaded_records_into_lines)
                if pipeline_log.getEffectiveLevel() > logging.INFO:
                    pipeline_log.setLevel(logging.INFO)
            ComponentProgress._users += 1
        return self

    def __exit__(self, *exc_info) -> None:
        ComponentProgress._current.tracker = None
        with ComponentProgress._lock:
            ComponentProgress._users -= 1
            if ComponentProgress._users == 0:
                pipeline_log = logging.getLogger(PIPELINE_LOGGER)
                pipeline_log.removeFilter(_turn_loaded_records_into_lines)
                pipeline_log.setLevel(ComponentProgress._saved_level)

    def loaded(self, component: str, class_name: str) -> None:
        now = self.clock()
        size = _component_bytes(self.source, component)
        what = f"{class_name}, {size / GB:.2f} GB" if size else class_name
        seconds = now - self._last
        # A small part that loaded at once is nothing a person waits on: kept out of the startup lines.
        level = logging.INFO if size >= NOTABLE_BYTES or seconds >= NOTABLE_SECONDS else logging.DEBUG
        component_log.log(level, "loaded %s (%s) in %.1f s", component, what, seconds)
        self._last = now


def _turn_loaded_records_into_lines(record: logging.LogRecord) -> bool:
    """A logger filter: diffusers' per-component INFO record becomes our line; records the logger did
    not show before stay unshown (its level is lowered only to see these)."""
    tracker = getattr(ComponentProgress._current, "tracker", None)
    found = LOADED_RECORD.match(record.getMessage()) if record.levelno == logging.INFO else None
    if tracker is not None and found:
        tracker.loaded(found.group(1), found.group(2))
    return record.levelno >= ComponentProgress._shown_level


def _component_bytes(source: str, component: str) -> int:
    """The bytes of a component's weight files in a local folder or the HF cache; 0 if not at hand."""
    from octoflux.pipelines.memory import weight_files

    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(source, "model_index.json")
        if not isinstance(index, str):
            return 0
        folder = Path(index).parent
    return sum(path.stat().st_size for path in weight_files(folder / component))
