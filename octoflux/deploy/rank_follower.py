"""Ranks 1..N-1 of `--context-parallel N` (`python -m octoflux.deploy.rank_follower`, a `RankStart` on stdin).

Each loads the model as rank 0 does, then runs every job rank 0 posts in the ranks' TCP store, until
rank 0 posts the stop message or goes away (see octoflux/deploy/context_parallel.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import pickle
import signal
import sys
from datetime import timedelta

from octoflux.deploy.context_parallel import (
    JOB_KEY,
    LOADED_KEY,
    STORE_HOST,
    RankStart,
    collective_stop,
    device_type,
    leave_process_group,
    never,
    rank_settings,
    share_cpu_threads,
)
from octoflux.pipelines.engine import Engine, GenerationCancelled, GenerationSpec, ModeNotOffered
from octoflux.pipelines.errors import PipelineError
from octoflux.pipelines.model_set import ModelSet
from octoflux.pipelines.parallel import init_ranks
from octoflux.settings import Settings

log = logging.getLogger(__name__)

# A rank waiting for the next job looks up whether rank 0 is still its parent this often.
IDLE_WAIT_S = 10


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the process that started this one dies (even by kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # elsewhere: the parent check in `_receive` and failing collectives end this rank


def _receive(store, number: int, parent_pid: int) -> GenerationSpec | None:
    """The next job from rank 0; None when told to stop or when rank 0 is gone."""
    import torch.distributed as dist

    key = JOB_KEY.format(number)
    while True:
        if os.getppid() != parent_pid:
            return None
        try:
            store.wait([key], timedelta(seconds=IDLE_WAIT_S))
            break
        except dist.DistStoreError as exc:
            if "timeout" not in str(exc).lower():
                raise
    return pickle.loads(store.get(key))


def follow(engine: ModelSet | Engine, store, control, parent_pid: int) -> None:
    """Run every job rank 0 posts, until it posts the stop message."""
    for number in itertools.count():
        spec = _receive(store, number, parent_pid)
        if spec is None:
            return
        # A cancelled or failed job: rank 0 raised the same at the same point and answers the client.
        with contextlib.suppress(GenerationCancelled, ModeNotOffered, PipelineError):
            model = engine.engine(spec.model) if isinstance(engine, ModelSet) else engine
            # Rank 0 decodes, screens and answers: the latents of this rank are not needed.
            model.generate(spec, should_stop=collective_stop(control, never), decode=False)


def follower_settings(start: RankStart) -> Settings:
    """A non-zero rank's settings: its own GPU, and no safety checker (rank 0 screens every image)."""
    return rank_settings(start.settings, start.rank).model_copy(update={"safety_checker": None})


def rank_main() -> int:
    """Entry point of ranks 1..N-1."""
    _die_with_parent()
    start: RankStart = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: rank 0 stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 drains, then posts the stop message
    from octoflux.core.engine_factory import build_models
    from octoflux.deploy.log_setup import configure_logging
    from octoflux.pipelines.loras import LoraLibrary

    settings = follower_settings(start)
    configure_logging(settings)
    logging.getLogger().setLevel(logging.WARNING)  # rank 0 says what every rank does; these say what fails
    share_cpu_threads(settings, start.world)
    if device_type(settings) == "cuda":
        import torch

        torch.cuda.set_device(start.rank)
    try:
        store, control = init_ranks(
            start.rank,
            start.world,
            STORE_HOST,
            start.store_port,
            device_type(settings),
            settings.context_parallel_timeout,
        )
        engine = build_models(settings, LoraLibrary(settings.lora_dir))
        store.set(LOADED_KEY.format(start.rank), b"1")
        follow(engine, store, control, start.parent_pid)
    except Exception as exc:
        if os.getppid() != start.parent_pid:
            return 0  # rank 0 left first; it said why
        log.error("context-parallel rank %d: %s", start.rank, str(exc).splitlines()[0][:300])
        return 1
    finally:
        leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(rank_main())
