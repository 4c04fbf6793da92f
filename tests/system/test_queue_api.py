"""The queue over real HTTP: API keys take turns (async jobs leased from the store and sync jobs in the
worker's queue alike), and an `Idempotency-Key` gives one job per key and body."""

from __future__ import annotations

import threading

import httpx
import pytest
from helpers.engine_control import WAIT, wait_until
from helpers.requests import ASYNC, URL_PATH, body

pytestmark = pytest.mark.usefixtures("controlled")

KEY_A, KEY_B = "key-a", "key-b"


@pytest.fixture(scope="module")
def server(server_factory, control):
    with server_factory(engine_factory=control.factory, warmup=False, api_keys=f"{KEY_A},{KEY_B}") as live:
        yield live


def auth(key: str, **extra) -> dict:
    return {"Authorization": f"Bearer {key}", **extra}


def submit(server, key: str, prompt: str, headers: dict | None = None, **fields) -> httpx.Response:
    payload = body(prompt, **fields)
    return httpx.post(f"{server.url}{URL_PATH}", json=payload, headers=auth(key, **ASYNC, **(headers or {})))


def wait_all_final(server, key: str, jobs: list[dict]) -> None:
    def final() -> bool:
        statuses = [httpx.get(job["poll_url"], headers=auth(key)).json()["status"] for job in jobs]
        return all(s in ("completed", "failed", "cancelled") for s in statuses)

    wait_until(final, 60, "the jobs to end", every=0.1)


def queued_metric(server) -> float:
    for line in httpx.get(f"{server.url}/metrics", headers=auth(KEY_A)).text.splitlines():
        if line.startswith("octoflux_async_jobs_queued "):
            return float(line.split()[1])
    return -1.0


def test_one_key_s_burst_of_async_jobs_does_not_hold_back_another_key_s_job(server, control):
    gate = control.hold("a0")
    a_jobs = [submit(server, KEY_A, "a0").json()]
    control.reached["a0"].wait(WAIT)
    a_jobs += [submit(server, KEY_A, f"a{n}").json() for n in range(1, 12)]
    b_job = submit(server, KEY_B, "b0").json()
    wait_until(lambda: queued_metric(server) == 12, what="/metrics to count the 12 waiting jobs")
    gate.set()
    wait_all_final(server, KEY_B, [b_job])
    ran = list(control.ran)
    for job in a_jobs:  # what has not run yet is not needed: cancel it rather than wait for it
        httpx.delete(job["poll_url"], headers=auth(KEY_A))
    assert ran[0] == "a0"
    assert ran.index("b0") <= 2, ran  # within the next two jobs, not after A's eleven
    assert [p for p in ran if p.startswith("a")] == [f"a{n}" for n in range(len(ran) - 1)]  # A's in order


def test_one_key_s_waiting_sync_requests_do_not_hold_back_another_key_s_request(server, control):
    gate = control.hold("sa0")
    answers: dict[str, httpx.Response] = {}

    def send(key: str, prompt: str) -> threading.Thread:
        def post() -> None:
            payload = body(prompt)
            answers[prompt] = httpx.post(
                f"{server.url}{URL_PATH}", json=payload, headers=auth(key), timeout=60
            )

        thread = threading.Thread(target=post)
        thread.start()
        return thread

    threads = [send(KEY_A, "sa0")]
    control.reached["sa0"].wait(WAIT)
    for n in range(1, 6):
        threads.append(send(KEY_A, f"sa{n}"))
        wait_until(lambda n=n: server.service.jobs.depth == n, what=f"{n} requests waiting")
    threads.append(send(KEY_B, "sb0"))
    wait_until(lambda: server.service.jobs.depth == 6, what="B's request waiting")
    gate.set()
    for thread in threads:
        thread.join(60)
    assert {response.status_code for response in answers.values()} == {200}
    assert control.ran[0] == "sa0" and control.ran.index("sb0") <= 2, control.ran


def test_an_idempotency_key_gives_one_job_and_refuses_another_body(server, control):
    key = {"Idempotency-Key": "order-17"}
    first = submit(server, KEY_A, "once", key)
    again = submit(server, KEY_A, "once", key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == first.json()
    other_key = submit(server, KEY_B, "once", key)  # keys are per API key
    assert other_key.status_code == 202 and other_key.json()["response_id"] != first.json()["response_id"]

    reused = submit(server, KEY_A, "something else", key)
    assert reused.status_code == 409
    assert (
        "Idempotency-Key" in reused.json()["detail"]
        and first.json()["response_id"] in reused.json()["detail"]
    )
    wait_all_final(server, KEY_A, [first.json()])
    wait_all_final(server, KEY_B, [other_key.json()])
    assert control.ran.count("once") == 2 and "something else" not in control.ran
    result = httpx.get(f"{first.json()['poll_url']}/result", headers=auth(KEY_A))
    assert result.status_code == 200 and submit(server, KEY_A, "once", key).json() == first.json()


def test_an_idempotency_key_without_async_is_ignored_and_an_empty_one_is_refused(server):
    sync = httpx.post(
        f"{server.url}{URL_PATH}", json=body("sync"), headers=auth(KEY_A, **{"Idempotency-Key": "s"})
    )
    assert sync.status_code == 200
    assert submit(server, KEY_A, "empty", {"Idempotency-Key": ""}).status_code == 422


def test_a_retry_with_its_idempotency_key_gets_its_job_back_even_when_the_queue_is_full(
    server_factory, control
):
    with server_factory(engine_factory=control.factory, warmup=False, max_queue=1) as full:
        gate = control.hold("running")
        running = submit(full, KEY_A, "running").json()
        assert control.reached["running"].wait(WAIT)
        key = {"Idempotency-Key": "order-18"}
        queued = submit(full, KEY_A, "queued", key)
        assert queued.status_code == 202, queued.text
        assert submit(full, KEY_A, "no room").status_code == 429  # the one place is taken
        # A client that lost the 202 retries: the queue is full of its own job, which it gets back.
        retried = submit(full, KEY_A, "queued", key)
        assert (retried.status_code, retried.json()) == (202, queued.json())
        assert submit(full, KEY_A, "another body", key).status_code == 409
        gate.set()
        wait_all_final(full, KEY_A, [running, queued.json()])
    assert control.ran.count("queued") == 1


def test_a_retry_gets_its_job_even_when_a_lora_it_names_was_deleted_since(server, control):
    from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

    lora = save_diffusers(make_lora(31), server.settings.lora_dir / "fleeting.safetensors")
    gate = control.hold("ahead")
    ahead = submit(server, KEY_A, "ahead").json()
    assert control.reached["ahead"].wait(WAIT)
    key = {"Idempotency-Key": "order-19"}
    first = submit(server, KEY_A, "styled", key, loras={"fleeting": 1.0})
    assert first.status_code == 202, first.text
    lora.unlink()
    assert submit(server, KEY_A, "styled again", loras={"fleeting": 1.0}).status_code == 422
    retried = submit(server, KEY_A, "styled", key, loras={"fleeting": 1.0})
    assert (retried.status_code, retried.json()) == (202, first.json())
    httpx.delete(first.json()["poll_url"], headers=auth(KEY_A))
    gate.set()
    wait_all_final(server, KEY_A, [ahead, first.json()])
