"""The job queue on its own: how long a client told to retry should wait."""

from __future__ import annotations

import pytest

from octoflux.core.queue import JobQueue, QueueFull
from octoflux.pipelines.engine import GenerationSpec


def spec(steps: int, images: int = 1) -> GenerationSpec:
    return GenerationSpec(prompt="x", width=512, height=512, steps=steps, guidance=3.5, seeds=[1] * images)


def test_retry_after_follows_measured_throughput():
    queue = JobQueue(max_queue=1)
    queue.observe(spec(steps=10), seconds=20.0)  # 8 s per unit of work
    queue.submit(spec(steps=10))
    with pytest.raises(QueueFull) as full:
        queue.submit(spec(steps=10))
    assert full.value.retry_after == 20
    queue.observe(spec(steps=10), seconds=2.0)
    assert queue.retry_after_seconds() < 20
    assert JobQueue(max_queue=1).retry_after_seconds() == 1
