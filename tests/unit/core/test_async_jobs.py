"""Async job records on their own, over a real SQLite state store: TTL, ownership, restarts."""

from __future__ import annotations

import time

from octoflux.core.async_jobs import AsyncJobs
from octoflux.core.queue import Job, JobQueue
from octoflux.pipelines.engine import GenerationSpec
from octoflux.state.store import open_state_store


def finished_job() -> Job:
    return Job(spec=GenerationSpec(prompt="x", width=512, height=512, steps=1, guidance=3.5, seeds=[1]))


def async_jobs(path, ttl: float = 60.0) -> AsyncJobs:
    jobs = AsyncJobs(
        open_state_store(f"sqlite:///{path}/state.db"), replica="r1", ttl_s=ttl, jobs=JobQueue(4)
    )
    jobs.heartbeat()
    return jobs


def test_finished_bodies_survive_a_restart_byte_for_byte(tmp_path):
    jobs = async_jobs(tmp_path)
    job = finished_job()
    jobs.create(job, owner="alice")
    body = bytes(range(256)) * 100
    assert jobs.complete(job.id, body)
    jobs.store.close()
    reopened = async_jobs(tmp_path)
    assert reopened.get(job.id, "alice").status == "completed"
    assert reopened.store.get_body(job.id) == body


def test_results_expire_after_the_ttl_and_belong_to_their_owner(tmp_path):
    # A TTL long enough that the reads right after completing come before it on a slow machine.
    jobs = async_jobs(tmp_path, ttl=1.0)
    job = finished_job()
    jobs.create(job, owner="alice")
    jobs.complete(job.id, b"{}")
    assert jobs.get(job.id, "alice").status == "completed"
    assert jobs.get(job.id, "bob") is None
    time.sleep(1.1)
    assert jobs.get(job.id, "alice") is None
    assert jobs.sweep() == 1


def test_pending_jobs_never_expire(tmp_path):
    jobs = async_jobs(tmp_path, ttl=0)
    job = finished_job()
    jobs.create(job, owner=None)
    assert jobs.get(job.id, None).status == "pending"


def test_a_cancel_wins_over_a_completion_that_arrives_later(tmp_path):
    jobs = async_jobs(tmp_path)
    job = finished_job()
    record = jobs.create(job, owner=None)
    assert jobs.cancel(record)
    assert not jobs.complete(job.id, b"{}")
    assert jobs.get(job.id, None).status == "cancelled" and jobs.store.get_body(job.id) is None
