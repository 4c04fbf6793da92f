"""`--context-parallel N`: one model served by N processes of one machine, each image's tokens split.

Rank 0 is the server process: HTTP, the queue and its worker as with one process. Ranks 1..N-1 are
child processes (`octoflux/deploy/rank_follower.py`, handed their settings on stdin) that load
the same model and run every job with rank 0: rank 0 puts each job's `GenerationSpec` in the ranks' TCP
store, every rank calls `Engine.generate` with it (the same seeds, so the same noise), diffusers splits the
transformer's sequence over the ranks, and rank 0's stop decision (cancel, deadline, shutdown) is
broadcast after every step so that all ranks stop at the same one.

A rank that exits or stalls past `--context-parallel-timeout` fails the running job with a 503, and the
server stops taking work and exits non-zero (the orchestrator restarts it); SIGTERM drains and stops every
rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from octoflux.core.errors import ShuttingDown
from octoflux.pipelines.engine import Engine, GenerationCancelled, GenerationSpec, ModeNotOffered, StopCheck
from octoflux.pipelines.errors import PipelineError
from octoflux.pipelines.model_set import ModelSet
from octoflux.pipelines.parallel import LayoutError, ParallelLayout, check_layout, init_ranks, parse_layout
from octoflux.settings import Settings

log = logging.getLogger(__name__)

STORE_HOST = "127.0.0.1"
JOB_KEY = "octoflux/job/{}"
LOADED_KEY = "octoflux/loaded/{}"
WATCH_INTERVAL_S = 0.2
# How long the other ranks get to leave on their own after the stop message, before they are killed.
STOP_GRACE_S = 10.0


class RanksLost(ShuttingDown):
    """A rank exited or stalled: the running job cannot finish, and this server is going away."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; the server is restarting, retry")
        self.reason = reason


@dataclass(frozen=True)
class RankStart:
    """What a non-zero rank is handed on stdin."""

    settings: Settings
    rank: int
    world: int
    store_port: int
    parent_pid: int


# ------------------------------------------------------------------ startup checks


def startup_layout(settings: Settings) -> ParallelLayout:
    """The layout `--context-parallel` asks for, checked against the model and the GPUs present."""
    import torch
    from diffusers import FluxTransformer2DModel

    from octoflux.pipelines.loader import model_source, resolve_device

    layout = parse_layout(settings.context_parallel)
    assert layout is not None, "only called with --context-parallel above 1"
    if settings.offload != "none":
        raise LayoutError(
            "--context-parallel keeps the whole model on every GPU; it does not combine with --offload"
        )
    device = resolve_device(settings.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    for entry in settings.model_entries:  # every served model splits its heads the same way
        source = model_source(entry.source, settings.tiny_dir)
        config = FluxTransformer2DModel.load_config(source, subfolder="transformer")
        check_layout(layout, int(config["num_attention_heads"]), device.type, gpus)
    return layout


def checked_layout(settings: Settings) -> ParallelLayout:
    """`startup_layout`, or its error as one line on stderr and exit status 2."""
    try:
        return startup_layout(settings)
    except LayoutError as exc:
        print(f"octoflux: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def rank_settings(settings: Settings, rank: int) -> Settings:
    """The settings of one rank: its own GPU (`cuda:rank`); on the CPU every rank shares the cores."""
    from octoflux.pipelines.loader import resolve_device

    if resolve_device(settings.device).type == "cuda":
        return settings.model_copy(update={"device": f"cuda:{rank}"})
    return settings


def layout_line(models: list[str], device_type: str, layout: ParallelLayout) -> str:
    """The startup line: `model flux-dev on 2 GPUs, ulysses=2`."""
    where = f"{layout.world} GPUs" if device_type == "cuda" else f"{layout.world} CPU ranks (gloo)"
    return f"model {', '.join(models)} on {where}, {layout.describe()}"


def share_cpu_threads(settings: Settings, world: int) -> None:
    """On the CPU the ranks share the cores: each takes its part, not all of them."""
    import torch

    from octoflux.pipelines.loader import resolve_device

    if resolve_device(settings.device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


# ------------------------------------------------------------------ the stop decision, every step


def collective_stop(control, decide: StopCheck) -> StopCheck:
    """A stop check every rank calls once per step: rank 0's `decide()` broadcast to all."""
    import torch
    import torch.distributed as dist

    def should_stop() -> bool:
        flag = torch.tensor([1 if decide() else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=control)
        return bool(flag.item())

    return should_stop


def never() -> bool:
    return False


# ------------------------------------------------------------------ rank 0


class RankGroup:
    """Rank 0's side: starts the other ranks, joins them, hands each job over and notices one lost."""

    def __init__(self, settings: Settings, layout: ParallelLayout):
        self.settings = settings
        self.layout = layout
        self.timeout_s = settings.context_parallel_timeout
        self.store_port = 0
        self.ranks: dict[int, subprocess.Popen] = {}
        self.lost_reason: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._store = None
        self._control = None
        self._jobs = itertools.count()
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def start(cls, settings: Settings) -> RankGroup:
        """Check the layout (a bad one: one line on stderr, exit 2), then launch the other ranks."""
        group = cls(settings, checked_layout(settings))
        group.launch()
        return group

    def stop_server_when_lost(self, server, service) -> None:
        """On a lost rank: stop taking work, let the running job fail, then stop `server` (uvicorn)."""

        def drain_and_exit(reason: str) -> None:
            def run() -> None:
                try:
                    service.drain()
                finally:
                    server.should_exit = True

            threading.Thread(target=run, name="octoflux-ranks-lost", daemon=True).start()

        self.on_lost = drain_and_exit

    def launch(self) -> None:
        """Start ranks 1..N-1 and watch them, from one thread that lives as long as they should: a rank's
        parent-death signal follows the thread that started it (the CLI's main thread, or a Ray replica's
        constructor thread, may not be that)."""
        share_cpu_threads(self.settings, self.layout.world)
        self.store_port = _free_port()
        launched = threading.Event()
        failed: list[BaseException] = []

        def launch_then_watch() -> None:
            try:
                for rank in range(1, self.layout.world):
                    self.ranks[rank] = self._spawn(rank)
            except BaseException as exc:  # handed to the caller below
                failed.append(exc)
                return
            finally:
                launched.set()
            self._watch()

        threading.Thread(target=launch_then_watch, name="octoflux-ranks", daemon=True).start()
        launched.wait()
        if failed:
            self.stop()
            raise failed[0]

    def _spawn(self, rank: int) -> subprocess.Popen:
        start = RankStart(self.settings, rank, self.layout.world, self.store_port, os.getpid())
        process = subprocess.Popen(
            [sys.executable, "-m", "octoflux.deploy.rank_follower"],
            stdin=subprocess.PIPE,
            # c10d warns on every idle wait for the next job that times out; errors still show.
            env={**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR"},
        )
        process.stdin.write(pickle.dumps(start))
        process.stdin.close()
        return process

    def engine_factory(self, settings: Settings, library) -> ModelSet | Engine:
        """`EngineFactory` for rank 0: join the ranks, then load the model as every rank does."""
        from octoflux.core.engine_factory import build_models

        if device_type(settings) == "cuda":
            import torch

            torch.cuda.set_device(0)
        self._store, self._control = init_ranks(
            0, self.layout.world, STORE_HOST, self.store_port, device_type(settings), self.timeout_s
        )
        built = build_models(rank_settings(settings, 0), library)
        # The first job (the warm-up) may start only when every rank has its model: loading is not
        # bounded by the collective timeout.
        self._store.wait([LOADED_KEY.format(rank) for rank in self.ranks])
        models = built.engines if isinstance(built, ModelSet) else {built.family: built}
        log.info("%s", layout_line(list(models), device_type(settings), self.layout))
        engines = {model_id: ParallelEngine(engine, self, model_id) for model_id, engine in models.items()}
        if isinstance(built, ModelSet):
            return ModelSet(engines, built.shared_with)
        return engines[built.family]

    # Jobs.

    def post(self, spec: GenerationSpec | None) -> None:
        """Hand a job (None: stop) to the other ranks."""
        number = next(self._jobs)
        self._store.set(JOB_KEY.format(number), pickle.dumps(spec))
        if number > 0:  # every rank has read the one before: they ran it with rank 0
            self._store.delete_key(JOB_KEY.format(number - 1))

    def stop_check(self, decide: StopCheck) -> StopCheck:
        return collective_stop(self._control, decide)

    # Losing a rank.

    def check_alive(self) -> None:
        if self.lost_reason is not None:
            raise RanksLost(self.lost_reason)

    def lose(self, reason: str) -> None:
        """Record the first loss, say it in one line, and tell the server (which drains and exits 1)."""
        with self._lock:
            if self.lost_reason is not None or self._stopping.is_set():
                return
            self.lost_reason = reason
        log.error("%s; stopping", reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def dead_rank_reason(self, wait_s: float = 1.0) -> str | None:
        """Which rank exited, if one did within `wait_s` (a failed collective often comes first)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, process in self.ranks.items():
                code = process.poll()
                if code is not None:
                    return f"context-parallel rank {rank} {_exit_words(code)}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            if self.lost_reason is None and (reason := self.dead_rank_reason(wait_s=0)) is not None:
                self.lose(reason)
        # Outlive the ranks: their parent-death signal follows this thread.
        for process in self.ranks.values():
            process.wait()

    def stop(self) -> None:
        """Tell the other ranks to leave, wait a little, then kill what is left; no process survives."""
        self._stopping.set()
        if self._store is not None and self.lost_reason is None:
            try:
                self.post(None)
            except Exception:  # the store is rank 0's own; a dead peer does not stop this
                log.debug("could not post the stop message", exc_info=True)
        deadline = time.monotonic() + (STOP_GRACE_S if self.lost_reason is None else 0)
        for process in self.ranks.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                process.wait(5)
        leave_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((STORE_HOST, 0))
        return sock.getsockname()[1]


def device_type(settings: Settings) -> str:
    from octoflux.pipelines.loader import resolve_device

    return resolve_device(settings.device).type


def _exit_words(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            log.debug("destroy_process_group failed", exc_info=True)


def _collective_error(exc: BaseException) -> str:
    """gloo's and NCCL's message without its source location, first sentence only."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return text.split(". ")[0][:200]


def _is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective (a peer gone or stalled), as opposed to the job's own error."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("Connection closed", "Connection reset", "Timed out", "gloo", "NCCL")
    )


class ParallelEngine:
    """The `Engine` rank 0's worker drives: each `generate` runs on every rank at once."""

    def __init__(self, engine: Engine, group: RankGroup, model_id: str):
        self._engine = engine
        self._group = group
        self._model_id = model_id

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, spec: GenerationSpec, should_stop: StopCheck = never, on_step=None):
        group = self._group
        group.check_alive()
        # Named, so the other ranks run this model even when rank 0 was called on it directly (warm-up).
        group.post(dataclasses.replace(spec, model=self._model_id))
        try:
            return self._engine.generate(spec, should_stop=group.stop_check(should_stop), on_step=on_step)
        except (GenerationCancelled, ModeNotOffered, PipelineError):
            raise  # every rank raised it at the same point
        except Exception as exc:
            if not _is_collective_failure(exc):
                raise
            group.lose(group.dead_rank_reason() or f"context-parallel ranks lost: {_collective_error(exc)}")
            raise RanksLost(group.lost_reason or "context-parallel ranks lost") from None
