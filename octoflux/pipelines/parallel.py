"""Context parallelism: one image's tokens split over several processes by diffusers' Ulysses/ring attention.

Torch is imported inside the functions: `parse_layout` is also used to check a flag's value in settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

# How long ranks wait for each other to start and load (not bounded by the collective timeout).
JOIN_TIMEOUT_S = 600.0
LAYOUT_FORMS = "N (Ulysses over N ranks) or 'ring=R,ulysses=U'"


class LayoutError(ValueError):
    """A context-parallel layout this model or machine cannot run; the message is the one line to print."""


@dataclass(frozen=True)
class ParallelLayout:
    ulysses: int = 1
    ring: int = 1

    @property
    def world(self) -> int:
        return self.ulysses * self.ring

    def describe(self) -> str:
        parts = [f"ring={self.ring}"] if self.ring > 1 else []
        if self.ulysses > 1:
            parts.append(f"ulysses={self.ulysses}")
        return ",".join(parts)


def parse_layout(text: str) -> ParallelLayout | None:
    """`--context-parallel`'s value; None for 1 (one process, no parallelism)."""
    value = text.strip().lower()
    if value.isdigit():
        count = int(value)
        if count < 1:
            raise ValueError(f"context-parallel must be {LAYOUT_FORMS}, not {text!r}")
        return ParallelLayout(ulysses=count) if count > 1 else None
    degrees = {"ring": 1, "ulysses": 1}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, _, number = part.partition("=")
        if name.strip() not in degrees or not number.strip().isdigit() or int(number) < 1:
            raise ValueError(f"context-parallel must be {LAYOUT_FORMS}, not {text!r}")
        degrees[name.strip()] = int(number)
    layout = ParallelLayout(ulysses=degrees["ulysses"], ring=degrees["ring"])
    return layout if layout.world > 1 else None


def valid_ulysses_degrees(heads: int, most: int) -> list[int]:
    """The Ulysses degrees from 2 to `most` that split `heads` attention heads evenly."""
    return [n for n in range(2, most + 1) if heads % n == 0]


def check_layout(layout: ParallelLayout, heads: int, device_type: str, gpus: int) -> None:
    """`LayoutError` unless the layout splits this transformer's heads and fits the GPUs present."""
    if heads % layout.ulysses:
        valid = ", ".join(map(str, valid_ulysses_degrees(heads, heads))) or "none"
        raise LayoutError(
            f"--context-parallel: ulysses={layout.ulysses} does not divide the model's {heads} attention "
            f"heads; valid: {valid}"
        )
    if device_type == "cuda" and layout.world > gpus:
        raise LayoutError(
            f"--context-parallel {layout.describe()} needs {layout.world} GPUs; {gpus} visible "
            "(CUDA_VISIBLE_DEVICES)"
        )
    if layout.ring > 1 and device_type != "cuda":
        raise LayoutError(
            "--context-parallel: ring attention needs a GPU attention backend that returns the log-sum-exp "
            "(cuDNN, flash, sage); on the CPU use ulysses only"
        )


def init_ranks(
    rank: int,
    world: int,
    store_host: str,
    store_port: int,
    device_type: str,
    timeout_s: float,
    join_timeout_s: float = JOIN_TIMEOUT_S,
):
    """Join the ranks' process group (NCCL on CUDA, gloo on the CPU) through a TCP store rank 0 hosts.

    Every collective fails after `timeout_s`; the ranks wait up to `join_timeout_s` for each other to
    start. Returns `(store, control_group)`: the store also carries jobs to the other ranks; the control
    group is a gloo group for the small CPU messages (a step's stop decision) whatever the device.
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    join_timeout = timedelta(seconds=max(timeout_s, join_timeout_s))
    store = dist.TCPStore(store_host, store_port, world, is_master=rank == 0, timeout=join_timeout)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return store, control


def wait_for_every_rank(timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Block until every rank gets here: ranks load at their own pace, and the groups diffusers makes next
    must be joined by all within the collective timeout."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    dist.monitored_barrier(group=dist.new_group(backend="gloo", timeout=timeout), timeout=timeout)


def enable_context_parallel(transformer, layout: ParallelLayout) -> None:
    """Split the transformer's sequence over the process group's ranks (which must be joined already)."""
    from diffusers import ContextParallelConfig

    from octoflux.pipelines import compat

    wait_for_every_rank()
    if layout.ring > 1:
        # SDPA ("native") has no log-sum-exp output, which ring attention merges its partial results with.
        transformer.set_attention_backend("_native_cudnn")
    config = ContextParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses)
    compat.enable_parallelism(transformer, config, compat.flux_plan_gathering_before_proj_out(transformer))
