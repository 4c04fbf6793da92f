"""Webhooks: URL safety, signatures, retries, limits and restarts, against a real receiver."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.engine_control import wait_until
from helpers.services import free_port
from helpers.webhook_receiver import Receiver, running_receiver, serve_in_thread, wait_final
from prometheus_client import REGISTRY
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from octoflux.settings import Settings
from octoflux.state.records import Delivery
from octoflux.state.store import StateStore, open_state_store
from octoflux.webhooks.dispatcher import WebhookDispatcher, retry_delay
from octoflux.webhooks.signing import new_webhook_secret
from octoflux.webhooks.urls import WEBHOOK_HEADER, WebhookUrlError, check_webhook_url

SECRET = new_webhook_secret()
RESPONSE_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def receiver():
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture
def open_outbox(tmp_path) -> Iterator[Callable[[Path], StateStore]]:
    """Opens the SQLite state store at a path, as a process would; every store is closed afterwards."""
    opened: list[StateStore] = []

    def open_one(path: Path = tmp_path / "state.db") -> StateStore:
        opened.append(open_state_store(f"sqlite:///{path}"))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def outbox(open_outbox) -> StateStore:
    return open_outbox()


@pytest.fixture
def make_dispatcher():
    started: list[WebhookDispatcher] = []

    def make(outbox, *, start: bool = True, **overrides) -> WebhookDispatcher:
        options = dict(retries=2, allow_private=True, backoff_s=0.05, jitter=0.0, poll_s=0.02, timeout_s=3.0)
        options.update(overrides)
        dispatcher = WebhookDispatcher(outbox, SECRET, **options)
        if start:
            dispatcher.start()
            started.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in started:
        dispatcher.stop()


def counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("octoflux_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def counted(outcome: str, before: float) -> float:
    """The counter once it moved past `before`: the dispatcher counts an attempt (and logs it) only
    after it has written the attempt's outcome to the outbox, which is what `wait_final` sees."""
    wait_until(lambda: counter(outcome) > before, what=f"the {outcome!r} webhook counter to move")
    return counter(outcome)


def attempt_lines(caplog, delivery_id: str, attempts: int) -> list[dict]:
    """The dispatcher's log lines about `delivery_id`, once there are `attempts` of them (written
    after the outbox record, like the counter)."""

    def lines() -> list[dict]:
        return [
            json.loads(r.getMessage())
            for r in caplog.records
            if r.name == "octoflux.webhooks" and delivery_id in r.getMessage()
        ]

    wait_until(lambda: len(lines()) >= attempts, what=f"{attempts} log lines about {delivery_id}")
    return lines()


def enqueue(dispatcher: WebhookDispatcher, url: str, job_id: str, kind: str = "completed") -> Delivery:
    error = {"completed": None, "failed": "CUDA out of memory", "cancelled": None}[kind]
    return dispatcher.enqueue(
        job_id, f"generation.{kind}", kind, f"https://api.example/v1/responses/{job_id}", error, url
    )


# --- Signing and payload ------------------------------------------------------------------------


def test_delivery_is_signed_and_verifies_with_standardwebhooks(receiver, outbox, make_dispatcher):
    dispatcher = make_dispatcher(outbox)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/ok", "job-signed")
    assert wait_final(outbox, delivery.id).status == "delivered"

    (call,) = receiver.bodies("ok")[-1:]
    payload = Webhook(SECRET).verify(call["body"], call["headers"])
    assert call["headers"]["webhook-id"] == delivery.id and delivery.id.startswith("msg_")
    assert call["headers"]["content-type"] == "application/json"
    assert payload["type"] == "generation.completed"
    assert payload["data"] == {
        "response_id": "job-signed",
        "status": "completed",
        "response_url": "https://api.example/v1/responses/job-signed",
        "error": None,
    }
    sent_at = dt.datetime.fromisoformat(payload["timestamp"])
    assert payload["timestamp"].endswith("Z") and abs(time.time() - sent_at.timestamp()) < 60
    assert len(call["body"]) < 1024  # no image bytes


def test_tampered_body_or_wrong_secret_fails_verification(receiver, outbox, make_dispatcher):
    dispatcher = make_dispatcher(outbox)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/ok", "job-tampered")
    wait_final(outbox, delivery.id)
    call = next(c for c in receiver.calls if c["headers"]["webhook-id"] == delivery.id)

    tampered = call["body"].replace(b"completed", b"cancelled")
    assert tampered != call["body"]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, call["headers"])
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(call["body"], call["headers"])


def test_failed_and_cancelled_jobs_send_their_own_types(receiver, outbox, make_dispatcher):
    dispatcher = make_dispatcher(outbox)
    failed = enqueue(dispatcher, f"{receiver.base}/hook/ok", "job-f", "failed")
    cancelled = enqueue(dispatcher, f"{receiver.base}/hook/ok", "job-c", "cancelled")
    wait_final(outbox, failed.id), wait_final(outbox, cancelled.id)

    by_id = {
        c["headers"]["webhook-id"]: Webhook(SECRET).verify(c["body"], c["headers"]) for c in receiver.calls
    }
    assert by_id[failed.id]["type"] == "generation.failed"
    assert by_id[failed.id]["data"]["error"] == "CUDA out of memory"
    assert by_id[failed.id]["data"]["status"] == "failed"
    assert by_id[cancelled.id]["type"] == "generation.cancelled"
    assert by_id[cancelled.id]["data"]["status"] == "cancelled"
    assert failed.id != cancelled.id


# --- Retries ------------------------------------------------------------------------------------


def test_receiver_answering_500_once_gets_the_same_webhook_id_again(receiver, outbox, make_dispatcher):
    retries_before = counter("retry")
    dispatcher = make_dispatcher(outbox)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/fail-once", "job-retry")
    final = wait_final(outbox, delivery.id)

    assert final.status == "delivered" and final.attempts == 2
    first, second = receiver.bodies("fail-once")
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == delivery.id
    assert first["body"] == second["body"]
    Webhook(SECRET).verify(second["body"], second["headers"])
    assert counter("retry") == retries_before + 1


def test_receiver_that_keeps_failing_is_given_up_after_the_retries(receiver, outbox, make_dispatcher):
    failed_before = counter("failed")
    dispatcher = make_dispatcher(outbox, retries=2)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/always-500", "job-gives-up")
    final = wait_final(outbox, delivery.id)

    assert final.status == "failed" and final.attempts == 3 and final.last_error == "HTTP 500"
    ids = {c["headers"]["webhook-id"] for c in receiver.bodies("always-500") if c["body"] == delivery.payload}
    assert ids == {delivery.id}
    assert counted("failed", failed_before) == failed_before + 1


def test_refused_connection_is_retried_then_failed(outbox, make_dispatcher):
    port = free_port()  # a port nobody listens on
    dispatcher = make_dispatcher(outbox, retries=1)
    delivery = enqueue(dispatcher, f"http://127.0.0.1:{port}/hook", "job-refused-conn")
    final = wait_final(outbox, delivery.id)
    assert final.status == "failed" and final.attempts == 2
    assert "ConnectError" in final.last_error


def test_timeout_is_a_failed_attempt(receiver, outbox, make_dispatcher):
    dispatcher = make_dispatcher(outbox, retries=0, timeout_s=0.5)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/slow", "job-slow")
    final = wait_final(outbox, delivery.id)
    assert final.status == "failed" and final.attempts == 1
    assert "no answer within 0.5 s" in final.last_error


def test_retry_schedule_doubles_from_three_seconds():
    schedule = [retry_delay(attempt, 3.0, jitter=0.0) for attempt in range(1, 6)]
    assert schedule == [3, 6, 12, 24, 48] and sum(schedule) == 93
    jittered = [retry_delay(1, 3.0, jitter=0.2) for _ in range(200)]
    assert 2.4 <= min(jittered) < max(jittered) <= 3.6


def test_delivery_survives_a_dispatcher_restart(receiver, tmp_path, open_outbox, make_dispatcher):
    path = tmp_path / "durable.db"
    observer = open_outbox(path)
    # The retry is due 2 s after the first attempt: the time this test has to see that attempt and
    # stop the dispatcher, even on a slow machine.
    first_store = open_outbox(path)
    first = make_dispatcher(first_store, backoff_s=2.0)
    delivery = enqueue(first, f"{receiver.base}/hook/fail-once", "job-restart")
    wait_until(lambda: observer.get_delivery(delivery.id).attempts > 0, what="the first attempt")
    first.stop()  # the process goes away after one failed attempt, before the retry
    first_store.close()
    assert observer.get_delivery(delivery.id).status == "pending"
    calls_before = len(receiver.bodies("fail-once"))

    reopened = open_outbox(path)
    make_dispatcher(reopened)
    final = wait_final(reopened, delivery.id)
    assert final.status == "delivered" and final.attempts == 2
    resent = receiver.bodies("fail-once")[calls_before:]
    assert [c["headers"]["webhook-id"] for c in resent] == [delivery.id]


def test_undelivered_message_enqueued_before_a_crash_is_sent_by_the_next_process(
    receiver, tmp_path, open_outbox
):
    path = tmp_path / "crash.db"
    crashed = open_outbox(path)
    never_started = WebhookDispatcher(crashed, SECRET, allow_private=True)
    delivery = enqueue(never_started, f"{receiver.base}/hook/ok", "job-crash")
    crashed.close()

    next_process = open_outbox(path)
    successor = WebhookDispatcher(next_process, SECRET, allow_private=True, poll_s=0.02)
    successor.start()
    try:
        assert wait_final(next_process, delivery.id).status == "delivered"
    finally:
        successor.stop()
    assert any(c["headers"]["webhook-id"] == delivery.id for c in receiver.calls)


# --- Receiver-side limits -----------------------------------------------------------------------


def test_redirects_are_not_followed(receiver, outbox, make_dispatcher):
    dispatcher = make_dispatcher(outbox, retries=0)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/redirect", "job-redirect")
    final = wait_final(outbox, delivery.id)
    assert final.status == "failed" and final.last_error == "HTTP 302"
    assert receiver.bodies("redirect-target") == []


def test_large_response_body_is_not_read_past_the_limit(receiver, outbox, make_dispatcher, caplog):
    caplog.set_level(logging.INFO, logger="octoflux.webhooks")
    dispatcher = make_dispatcher(outbox, max_response_bytes=RESPONSE_LIMIT)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/huge", "job-huge")
    # Reading the endless body would never end: the attempt would time out and be retried.
    final = wait_final(outbox, delivery.id)
    assert final.status == "delivered" and final.attempts == 1
    (line,) = attempt_lines(caplog, delivery.id, attempts=1)
    assert line["status_code"] == 200 and line["response_bytes"] == RESPONSE_LIMIT


def test_one_json_log_line_per_attempt_without_the_secret(receiver, outbox, make_dispatcher, caplog):
    caplog.set_level(logging.INFO, logger="octoflux.webhooks")
    dispatcher = make_dispatcher(outbox)
    delivery = enqueue(dispatcher, f"{receiver.base}/hook/fail-once", "job-logged")
    wait_final(outbox, delivery.id)
    lines = attempt_lines(caplog, delivery.id, attempts=2)
    assert [line["attempt"] for line in lines] == [1, 2]
    assert [line["status_code"] for line in lines] == [500, 200]
    assert [line["outcome"] for line in lines] == ["retry", "delivered"]
    assert all(line["job"] == "job-logged" and line["ms"] >= 0 for line in lines)
    secret_body = SECRET.removeprefix("whsec_")
    assert not any(secret_body in r.getMessage() for r in caplog.records)


# --- URL safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http:///no-host",
        "https://",
        "garbage",
        "",
        "http://exa mple.com/hook",
        "http://example.com:99999/hook",
        "http://exa_mple..com/hook",
        "http://example.com/\nX-Injected: 1",
        "https://example.com/" + "a" * 3000,
    ],
)
def test_bad_urls_are_refused_naming_the_header(url):
    with pytest.raises(WebhookUrlError) as caught:
        check_webhook_url(url, allow_private=True, resolve=lambda host, port: ["93.184.216.34"])
    assert WEBHOOK_HEADER in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.5/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://240.0.0.1/hook",
        "http://[::1]/hook",
        "http://[fd00:ec2::254]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 form of 169.254.169.254
        "http://100.64.0.1/hook",
    ],
)
def test_private_targets_are_refused_without_the_flag(url):
    with pytest.raises(WebhookUrlError) as caught:
        check_webhook_url(url, allow_private=False)
    assert WEBHOOK_HEADER in str(caught.value) and "--webhook-allow-private" in str(caught.value)
    assert check_webhook_url(url, allow_private=True) == url


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://[2002:7f00:1::]/hook", "a loopback address"),  # 6to4 form of 127.0.0.1
        ("http://[2002:a9fe:a9fe::]/hook", "a cloud metadata address"),  # 6to4 form of 169.254.169.254
        ("http://[2002:a00:7::]/hook", "a private address"),  # 6to4 form of 10.0.0.7
        # Teredo: server 65.54.227.120, client (stored inverted) 127.0.0.1 and 169.254.169.254
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook", "a loopback address"),
        ("http://[2001:0:4136:e378:8000:63bf:5601:5601]/hook", "a cloud metadata address"),
    ],
)
def test_6to4_and_teredo_forms_are_refused_as_the_address_they_carry(url, reason):
    with pytest.raises(WebhookUrlError) as caught:
        check_webhook_url(url, allow_private=False)
    message = str(caught.value)
    assert message.startswith(f"{WEBHOOK_HEADER}: host ") and f", {reason}; " in message
    assert "--webhook-allow-private" in message
    assert check_webhook_url(url, allow_private=True) == url
    public = "http://[2002:5db8:d822::]/hook"  # 6to4 form of 93.184.216.34: a public relay, accepted
    assert check_webhook_url(public, allow_private=False) == public


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2@hooks.example/hook",
        "https://tok_hunter2@hooks.example/hook",
        "http://:hunter2@hooks.example/hook",
        "http://user:hunter2@93.184.216.34/hook",
    ],
)
def test_urls_with_credentials_are_refused_without_repeating_them(url):
    with pytest.raises(WebhookUrlError) as caught:
        check_webhook_url(url, allow_private=True, resolve=lambda host, port: ["93.184.216.34"])
    message = str(caught.value)
    assert message.startswith(f"{WEBHOOK_HEADER}:") and "credentials are not allowed" in message
    assert "hunter2" not in message


def test_host_with_any_private_record_is_refused():
    def resolve(host, port):
        return {"public.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.7"]}[host]

    assert check_webhook_url("https://public.example/h", allow_private=False, resolve=resolve)
    with pytest.raises(WebhookUrlError, match="10.0.0.7, a private address"):
        check_webhook_url("https://mixed.example/h", allow_private=False, resolve=resolve)


def test_unresolvable_host_is_refused():
    def resolve(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(WebhookUrlError, match=f"{WEBHOOK_HEADER}: host 'nowhere.example' does not resolve"):
        check_webhook_url("https://nowhere.example/h", allow_private=False, resolve=resolve)


def test_dns_rebinding_to_loopback_is_refused_at_delivery(receiver, outbox, make_dispatcher):
    answers = {"rebind.example": ["93.184.216.34"]}

    def resolve(host, port):
        return answers[host]

    url = f"http://rebind.example:{receiver.port}/hook/rebound"
    assert check_webhook_url(url, allow_private=False, resolve=resolve) == url
    answers["rebind.example"] = ["127.0.0.1"]  # the name now points inside

    refused_before = counter("refused")
    dispatcher = make_dispatcher(outbox, allow_private=False, resolve=resolve)
    delivery = enqueue(dispatcher, url, "job-rebind")
    final = wait_final(outbox, delivery.id)
    assert final.status == "failed" and final.attempts == 1 and "loopback" in final.last_error
    assert receiver.bodies("rebound") == []
    assert counted("refused", refused_before) == refused_before + 1


def test_request_goes_to_the_checked_address_with_the_original_host(receiver, outbox, make_dispatcher):
    def resolve(host, port):
        assert host == "hooks.example.test"
        return ["127.0.0.1"]

    dispatcher = make_dispatcher(outbox, resolve=resolve)
    delivery = enqueue(dispatcher, f"http://hooks.example.test:{receiver.port}/hook/pinned", "job-pinned")
    assert wait_final(outbox, delivery.id).status == "delivered"
    (call,) = receiver.bodies("pinned")
    assert call["headers"]["host"] == f"hooks.example.test:{receiver.port}"


def _self_signed(tmp_path: Path, hostname: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_https_to_the_checked_address_keeps_sni_and_verifies_the_certificate(
    tmp_path, outbox, make_dispatcher
):
    cert_file, key_file = _self_signed(tmp_path, "hooks.example.test")
    tls_receiver = Receiver()
    server, thread, port = serve_in_thread(
        tls_receiver.app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)
    )
    try:
        trust = ssl.create_default_context(cafile=str(cert_file))
        dispatcher = make_dispatcher(outbox, resolve=lambda host, p: ["127.0.0.1"], verify=trust)
        delivery = enqueue(dispatcher, f"https://hooks.example.test:{port}/hook/tls", "job-tls")
        assert wait_final(outbox, delivery.id).status == "delivered"
        (call,) = tls_receiver.bodies("tls")
        Webhook(SECRET).verify(call["body"], call["headers"])

        # A certificate for another name is refused: the name checked is the URL's host.
        wrong = make_dispatcher(outbox, resolve=lambda host, p: ["127.0.0.1"], verify=trust, retries=0)
        other = enqueue(wrong, f"https://other.example.test:{port}/hook/tls", "job-tls-wrong")
        final = wait_final(outbox, other.id)
        assert final.status == "failed" and "certificate" in final.last_error.lower()
    finally:
        server.should_exit = True
        thread.join(5)


# --- Settings -----------------------------------------------------------------------------------


def test_webhook_secret_must_be_in_the_standard_format(outbox):
    secret = new_webhook_secret()
    assert Settings(webhook_secret=secret).webhook_secret == secret
    assert Settings().webhook_secret == "" and Settings().webhook_retries == 5
    for bad, reason in [
        ("not-a-secret", "must start with 'whsec_'"),
        ("whsec_!!!not-base64", "not base64"),
        ("whsec_c2hvcnQ=", "24-64 bytes"),
    ]:
        with pytest.raises(ValueError, match=reason):
            Settings(webhook_secret=bad)
    assert secret not in repr(Settings(webhook_secret=secret))
    with pytest.raises(ValueError, match="--webhook-secret"):
        WebhookDispatcher(outbox, "")
