"""Webhooks end to end: async calls with `X-OctoFlux-Webhook-Url` on a real server, a real receiver."""

from __future__ import annotations

import time

import httpx
import pytest
from helpers.engine_control import WAIT, wait_until
from helpers.requests import ASYNC, body
from helpers.webhook_receiver import running_receiver, wait_final
from standardwebhooks import Webhook

from octoflux.core.errors import WORKER_LOST
from octoflux.state.records import JobRecord
from octoflux.state.store import open_state_store
from octoflux.webhooks.message import message_id
from octoflux.webhooks.signing import new_webhook_secret
from octoflux.webhooks.urls import WEBHOOK_HEADER

SECRET = new_webhook_secret()


@pytest.fixture(scope="module")
def receiver():
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def server(server_factory, control):
    with server_factory(
        engine_factory=control.factory, warmup=False, webhook_secret=SECRET, webhook_allow_private=True
    ) as live:
        # A short retry schedule: the production one waits 3 s before the first retry.
        dispatcher = live.service.webhooks
        dispatcher.backoff_s, dispatcher.jitter, dispatcher.poll_s = 0.05, 0.0, 0.05
        yield live


pytestmark = pytest.mark.usefixtures("controlled")


def submit(live, hook_url: str, prompt: str, headers: dict | None = None) -> httpx.Response:
    headers = {**ASYNC, WEBHOOK_HEADER: hook_url, **(headers or {})}
    return httpx.post(f"{live.url}/generate/flux-dev", json=body(prompt), headers=headers, timeout=WAIT)


def calls_for(receiver, behaviour: str, response_id: str, count: int = 1) -> list[dict]:
    """The receiver's calls about one job, verified with the signing secret, once `count` arrived."""

    def about_job() -> list[dict]:
        return [c for c in receiver.bodies(behaviour) if response_id.encode() in c["body"]]

    wait_until(lambda: len(about_job()) >= count, what=f"{count} webhook calls about {response_id}")
    return [{**call, "event": Webhook(SECRET).verify(call["body"], call["headers"])} for call in about_job()]


def test_completed_job_sends_one_signed_webhook(server, receiver):
    accepted = submit(server, f"{receiver.base}/hook/completed", "a signed lighthouse")
    assert accepted.status_code == 202
    response_id = accepted.json()["response_id"]

    (call,) = calls_for(receiver, "completed", response_id)
    event = call["event"]
    assert event["type"] == "generation.completed"
    assert event["data"] == {
        "response_id": response_id,
        "status": "completed",
        "response_url": f"{server.url}/v1/responses/{response_id}/result",
        "error": None,
    }
    assert call["headers"]["webhook-id"] == message_id(response_id, "generation.completed")
    result = httpx.get(event["data"]["response_url"], timeout=WAIT)
    assert result.status_code == 200 and len(result.json()["images"]) == 1
    delivery = wait_final(server.service.state, call["headers"]["webhook-id"])
    assert (delivery.status, delivery.attempts) == ("delivered", 1)
    time.sleep(0.3)  # a second message would have been sent by now
    assert len(calls_for(receiver, "completed", response_id)) == 1


def test_failed_job_sends_generation_failed(server, receiver, control):
    def explode(spec):
        raise RuntimeError("the pipeline broke")

    control.fault = explode
    response_id = submit(server, f"{receiver.base}/hook/failed", "a broken lighthouse").json()["response_id"]
    (call,) = calls_for(receiver, "failed", response_id)
    assert call["event"]["type"] == "generation.failed"
    data = call["event"]["data"]
    assert data["status"] == "failed" and data["response_url"] is None
    assert "the pipeline broke" in data["error"]


def test_cancelled_job_sends_generation_cancelled_once(server, receiver, control):
    gate = control.hold("a cancelled lighthouse")
    accepted = submit(server, f"{receiver.base}/hook/cancelled", "a cancelled lighthouse").json()
    assert control.reached["a cancelled lighthouse"].wait(WAIT)
    assert httpx.delete(accepted["poll_url"], timeout=WAIT).status_code == 200
    gate.set()  # the worker stops at this step; the job is already final, so nothing more is sent

    (call,) = calls_for(receiver, "cancelled", accepted["response_id"])
    assert call["event"]["type"] == "generation.cancelled"
    assert call["event"]["data"]["status"] == "cancelled"
    wait_until(lambda: server.service.jobs.running is None, what="the worker to stop")
    time.sleep(0.3)
    assert len(calls_for(receiver, "cancelled", accepted["response_id"])) == 1


def test_receiver_answering_500_once_gets_the_same_webhook_id_again(server, receiver):
    response_id = submit(server, f"{receiver.base}/hook/fail-once", "a retried lighthouse").json()[
        "response_id"
    ]
    first, second = calls_for(receiver, "fail-once", response_id, count=2)
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    assert first["body"] == second["body"] and first["event"]["type"] == "generation.completed"
    delivery = wait_final(server.service.state, first["headers"]["webhook-id"])
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("delivered", 2, None)


def header_error(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["header", WEBHOOK_HEADER]
    return detail["msg"]


def test_webhook_header_on_a_sync_call_is_a_422(server, receiver):
    response = httpx.post(
        f"{server.url}/generate/flux-dev",
        json=body("a sync lighthouse"),
        headers={WEBHOOK_HEADER: f"{receiver.base}/hook/sync"},
        timeout=WAIT,
    )
    assert "needs an async call" in header_error(response)


def test_internationalized_host_is_named_as_sent(server):
    # Header bytes are UTF-8 here; the 422 must show the host, not its latin-1 mojibake.
    url = "https://例え.テスト/hook"
    response = httpx.post(
        f"{server.url}/generate/flux-dev",
        json=body("an idn lighthouse"),
        headers={**ASYNC, WEBHOOK_HEADER: url.encode()},
        timeout=WAIT,
    )
    assert "'例え.テスト' does not resolve" in header_error(response)


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "not a url", "https://"])
def test_bad_webhook_urls_are_a_422_naming_the_header(server, url):
    message = header_error(submit(server, url, "a badly hooked lighthouse"))
    assert message.startswith(f"{WEBHOOK_HEADER}:")


def test_private_target_is_refused_without_the_flag(server_factory, receiver):
    with server_factory(warmup=False, webhook_secret=SECRET, wait_ready=False) as strict:
        message = header_error(submit(strict, f"{receiver.base}/hook/private", "a private lighthouse"))
    assert "loopback" in message and "--webhook-allow-private" in message
    assert receiver.bodies("private") == []


def test_webhook_url_with_credentials_is_a_422_naming_the_header(server, receiver):
    # Refused even where private receivers are allowed: the URL is stored and logged.
    url = f"http://user:hunter2@127.0.0.1:{receiver.port}/hook/credentials"
    response = submit(server, url, "a lighthouse with a password")
    message = header_error(response)
    assert message.startswith(f"{WEBHOOK_HEADER}:") and "credentials are not allowed" in message
    assert "hunter2" not in response.text
    assert receiver.bodies("credentials") == []


def test_6to4_form_of_a_metadata_address_is_a_422_naming_the_header(server_factory):
    with server_factory(warmup=False, webhook_secret=SECRET, wait_ready=False) as strict:
        message = header_error(submit(strict, "http://[2002:a9fe:a9fe::]/latest/", "a wrapped lighthouse"))
    assert message.startswith(f"{WEBHOOK_HEADER}:") and "a cloud metadata address" in message


def test_webhook_header_without_a_secret_is_a_422(server_factory, receiver):
    with server_factory(warmup=False, wait_ready=False) as unsigned:
        message = header_error(submit(unsigned, f"{receiver.base}/hook/unsigned", "an unsigned lighthouse"))
    assert "no webhook secret" in message and "--webhook-secret" in message


def test_delivery_survives_a_restart_and_a_job_out_of_attempts_is_announced(
    server_factory, receiver, tmp_path
):
    settings = dict(warmup=False, webhook_secret=SECRET, webhook_allow_private=True, state_dir=tmp_path)
    with server_factory(**settings) as first:
        response_id = submit(first, f"{receiver.base}/hook/fail-once", "a restarted lighthouse").json()[
            "response_id"
        ]
        calls_for(receiver, "fail-once", response_id)  # the first attempt got a 500; a retry is ~3 s away
    stopped_at = time.time()
    # A job whose process died on its last attempt (the lease lapsed): the next process fails it and says so.
    store = open_state_store(f"sqlite:///{tmp_path.resolve()}/state.db")
    hook = f"{receiver.base}/hook/orphan"
    lost = JobRecord("orphan-1", None, "req", time.time(), replica="gone", status="running", webhook_url=hook)
    lost.attempts, lost.lease_until = 2, time.time() - 1
    store.create_job(lost)
    store.close()

    with server_factory(**settings, wait_ready=False):
        first_call, retry = calls_for(receiver, "fail-once", response_id, count=2)
        (orphan,) = calls_for(receiver, "orphan", "orphan-1")
    assert retry["headers"]["webhook-id"] == first_call["headers"]["webhook-id"]
    assert int(retry["headers"]["webhook-timestamp"]) >= int(stopped_at)  # sent by the second process
    assert retry["event"]["data"]["response_url"].endswith(f"/v1/responses/{response_id}/result")
    assert orphan["event"]["type"] == "generation.failed"
    assert WORKER_LOST in orphan["event"]["data"]["error"]


def test_a_job_rolled_back_on_a_full_queue_sends_no_webhook(server, receiver, monkeypatch):
    """The queue fills between the room check and the enqueue (requests racing): the client gets a 429
    and never sees the job's id, so nobody may hear of that job."""
    with monkeypatch.context() as patched:
        patched.setattr(server.service.jobs, "check_room", lambda: None)
        patched.setattr(server.service.jobs, "max_queue", 0)
        refused = submit(server, f"{receiver.base}/hook/rolledback", "a refused lighthouse")
    assert refused.status_code == 429
    accepted = submit(server, f"{receiver.base}/hook/rolledback", "an accepted lighthouse")
    response_id = accepted.json()["response_id"]
    calls_for(receiver, "rolledback", response_id)  # sent after the refused job's would have been
    (only,) = receiver.bodies("rolledback")
    assert response_id.encode() in only["body"]


def test_a_job_cancelled_through_another_replica_leaves_nothing_behind_here(
    server, server_factory, control, receiver
):
    """Replica A runs the job; a DELETE through replica B makes it final. A keeps no trace of it in memory."""
    gate = control.hold("a job cancelled elsewhere")
    accepted = submit(server, f"{receiver.base}/hook/elsewhere", "a job cancelled elsewhere").json()
    control.reached["a job cancelled elsewhere"].wait(WAIT)
    job_id = accepted["response_id"]
    service = server.service
    with server_factory(
        warmup=False, wait_ready=False, state_dir=server.settings.state_dir, webhook_secret=SECRET
    ) as other:
        cancelled = httpx.delete(f"{other.url}/v1/responses/{job_id}", timeout=WAIT)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        gate.set()  # the held step returns; the worker sees the cancel at the next one
        wait_until(lambda: service.jobs.running is None, what="replica A's worker to stop the job")

    def holders(owner) -> list[str]:
        return [
            name
            for name, value in vars(owner).items()
            if isinstance(value, dict | set | list) and any(job_id in repr(item) for item in value)
        ]

    wait_until(lambda: not holders(service) and not holders(service.async_jobs), what="A to forget the job")
