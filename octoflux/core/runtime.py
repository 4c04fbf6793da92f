"""Warm-up before `/readyz` turns 200, from the settings: no user request pays a compile."""

from __future__ import annotations

from octoflux.core.queue import JobQueue
from octoflux.pipelines.engine import Engine
from octoflux.pipelines.warmup import WarmupReport
from octoflux.pipelines.warmup import warm_up as warm_up_engine
from octoflux.settings import Settings


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
        image_modes=engine.family_info.image_inputs,  # schnell serves text-to-image only
    )
    if report.throughput_spec is not None and report.throughput_seconds is not None:
        jobs.observe(report.throughput_spec, report.throughput_seconds)
    return report
