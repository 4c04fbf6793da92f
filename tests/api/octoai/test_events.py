"""Live progress: `GET /v1/responses/{id}/events` read through real HTTP clients (httpx-sse, raw lines),
and its SSE wire format decoded by httpx-sse's own decoder."""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from helpers.engine_control import WAIT, wait_until
from helpers.requests import ASYNC, body
from httpx_sse import connect_sse
from httpx_sse._decoders import SSEDecoder
from PIL import Image

from octoflux.api.octoai import events as events_route
from octoflux.api.octoai.sse import KEEPALIVE, encode_sse, sse_frame
from octoflux.core.progress import failed_event, progress_event

KEY, OTHER_KEY = "key-a", "key-b"
pytestmark = pytest.mark.usefixtures("controlled")


@pytest.fixture(scope="module")
def server(server_factory, control, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("events-state")
    with server_factory(
        engine_factory=control.factory, warmup=False, api_keys=f"{KEY},{OTHER_KEY}", state_dir=state_dir
    ) as live:
        yield live


def client(key: str = KEY) -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=WAIT)


def submit(live, prompt: str, steps: int = 4) -> dict:
    with client() as http:
        response = http.post(
            f"{live.url}/generate/flux-dev", json=body(prompt, steps=steps, seed=9), headers=ASYNC
        )
    assert response.status_code == 202, response.text
    return response.json()


class Watcher:
    """Reads one event stream on a thread; `connected` is set once the response headers arrived."""

    def __init__(self, url: str, **params):
        self.connected = threading.Event()
        self._pool = ThreadPoolExecutor(1)
        self.result: Future[list[tuple[str, str, dict]]] = self._pool.submit(self._read, url, params)

    def _read(self, url: str, params: dict) -> list[tuple[str, str, dict]]:
        with client() as http, connect_sse(http, "GET", url, params=params) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            self.connected.set()
            return [(sse.event, sse.id, sse.json()) for sse in source.iter_sse()]

    def events(self) -> list[tuple[str, str, dict]]:
        try:
            return self.result.result(WAIT)
        finally:
            self._pool.shutdown()


def watch_held_job(live, control, prompt: str, steps: int = 4, watchers: int = 1, **params):
    """Submit a job parked at its first step, connect watchers, then let it run."""
    gate = control.hold(prompt)
    accepted = submit(live, prompt, steps)
    assert control.reached[prompt].wait(WAIT)
    started = [Watcher(f"{accepted['poll_url']}/events", **params) for _ in range(watchers)]
    for watcher in started:
        assert watcher.connected.wait(WAIT)
    return accepted, gate, started


def test_progress_rises_to_the_last_step_then_completed(server, control):
    accepted, gate, (watcher,) = watch_held_job(server, control, "a rising moon", steps=4)
    gate.set()
    events = watcher.events()

    names = [name for name, _, _ in events]
    assert names == ["progress"] * 4 + ["completed"]  # no previews unless asked
    progress = [data for name, _, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert all(p["steps"] == 4 and p["image_batch"] == 0 for p in progress)
    assert progress[0]["eta_s"] is None and progress[-1]["eta_s"] == 0.0
    assert all(isinstance(p["eta_s"], float) for p in progress[2:])
    ids = [int(event_id) for name, event_id, _ in events if name == "progress"]
    assert ids == sorted(ids) and len(set(ids)) == 4
    response_id = accepted["response_id"]
    assert events[-1][2] == {
        "status": "completed",
        "response_url": f"{server.url}/v1/responses/{response_id}/result",
    }
    with client() as http:
        assert http.get(events[-1][2]["response_url"]).status_code == 200


def test_previews_decode_as_jpeg(server, control):
    _, gate, (watcher,) = watch_held_job(server, control, "a previewed moon", steps=8, preview="1")
    gate.set()
    events = watcher.events()

    previews = [data for name, _, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [4, 8]
    for preview in previews:
        header, _, encoded = preview["image"].partition(",")
        assert header == "data:image/jpeg;base64"
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "JPEG" and image.size == (256, 256)
    assert [name for name, _, _ in events].count("progress") == 8
    assert events[-1][0] == "completed"


def test_a_finished_job_sends_its_final_event_at_once(server, control):
    accepted = submit(server, "an early moon")
    with client() as http:
        wait_until(lambda: http.get(accepted["poll_url"]).json()["status"] == "completed", what="the job")
    watcher = Watcher(f"{accepted['poll_url']}/events", preview="1")
    events = watcher.events()
    assert [name for name, _, _ in events] == ["completed"]


def test_cancel_ends_the_stream_with_cancelled(server, control):
    accepted, gate, (watcher,) = watch_held_job(server, control, "a cancelled moon")
    with client() as http:
        assert http.delete(accepted["poll_url"]).status_code == 200
    events = watcher.events()  # ends while the worker is still parked: the record says cancelled
    gate.set()
    assert [name for name, _, _ in events] == ["progress", "cancelled"]
    assert events[-1][2] == {"status": "cancelled"}


def test_a_failed_job_ends_the_stream_with_its_error(server, control):
    def explode(spec):
        if spec.prompt == "a failing moon":
            raise RuntimeError("the pipeline broke")

    control.fault = explode
    accepted = submit(server, "a failing moon")
    events = Watcher(f"{accepted['poll_url']}/events").events()
    assert events[-1][0] == "failed" and "the pipeline broke" in events[-1][2]["error"]


def test_two_watchers_see_the_same_events(server, control):
    _, gate, watchers = watch_held_job(server, control, "a watched moon", watchers=2)
    gate.set()
    first, second = (watcher.events() for watcher in watchers)
    assert [name for name, _, _ in first][-1] == "completed"
    strip_eta = [[(n, i, {**d, "eta_s": None}) for n, i, d in events] for events in (first, second)]
    assert strip_eta[0] == strip_eta[1]


def test_dropping_the_stream_leaves_the_job_running(server, control):
    gate = control.hold("an abandoned moon")
    # Enough steps that the job still runs when the server next writes to the dropped stream (the
    # next progress event), which is when it can notice the drop: 4 steps can end before that.
    accepted = submit(server, "an abandoned moon", steps=12)
    assert control.reached["an abandoned moon"].wait(WAIT)
    with client() as http, connect_sse(http, "GET", f"{accepted['poll_url']}/events") as source:
        assert next(source.iter_sse()).event == "progress"
    gate.set()
    with client() as http:
        wait_until(lambda: http.get(accepted["poll_url"]).json()["status"] == "completed", what="the job")
    assert control.steps["an abandoned moon"] == 12


def test_keepalive_comments_while_nothing_happens(server, control, monkeypatch):
    monkeypatch.setattr(events_route, "KEEPALIVE_EVERY_S", 0.2)
    gate = control.hold("a quiet moon")
    accepted = submit(server, "a quiet moon")
    assert control.reached["a quiet moon"].wait(WAIT)
    lines = []
    with client() as http, http.stream("GET", f"{accepted['poll_url']}/events") as response:
        for line in response.iter_lines():
            lines.append(line)
            if lines.count(": keep-alive") == 2:
                gate.set()
    assert lines.count(": keep-alive") >= 2
    assert "event: completed" in lines and lines.index("event: progress") < lines.index(": keep-alive")


def test_other_tokens_get_404_and_no_token_401(server):
    accepted = submit(server, "a private moon")
    url = f"{accepted['poll_url']}/events"
    with client(OTHER_KEY) as other:
        response = other.get(url)
        assert response.status_code == 404 and "another token" in response.json()["detail"]
        assert other.get(f"{server.url}/v1/responses/no-such-job/events").status_code == 404
    assert httpx.get(url, timeout=WAIT).status_code == 401


@pytest.mark.parametrize(
    "last_event_id",
    [b"\xb2", b"9" * 5000, b"-1"],
    ids=["superscript-two-byte", "5000-digits", "negative"],
)
def test_a_malformed_last_event_id_is_a_422_naming_the_header(server, last_event_id):
    accepted = submit(server, "a resumed moon")
    with client() as http:
        response = http.get(f"{accepted['poll_url']}/events", headers={"Last-Event-ID": last_event_id})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["header", "last-event-id"]
    assert "Last-Event-ID" in detail["msg"] and len(detail["msg"]) < 200


def test_a_watcher_on_another_replica_follows_the_job(server_factory, server, control):
    """Two processes on one state store: the job runs on one, the stream is served by the other."""
    # Parked on `server` before the other starts: a process sharing the store takes any waiting job.
    accepted, gate, _ = watch_held_job(server, control, "a distant moon", watchers=0)
    with server_factory(
        warmup=False, api_keys=KEY, state_dir=server.settings.state_dir, wait_ready=False
    ) as other_replica:
        watcher = Watcher(f"{other_replica.url}/v1/responses/{accepted['response_id']}/events")
        assert watcher.connected.wait(WAIT)
        gate.set()
        events = watcher.events()
    assert [name for name, _, _ in events] == ["progress"] * 4 + ["completed"]
    assert events[-1][2]["response_url"].startswith(other_replica.url)


def test_step_publisher_logs_progress_and_every_fourth_step_a_preview(tmp_path, caplog):
    import torch

    from octoflux.core.progress import StepPublisher
    from octoflux.pipelines.engine import StepEvent
    from octoflux.state.records import JobRecord
    from octoflux.state.store import open_state_store

    store = open_state_store(f"sqlite:///{tmp_path}/state.db")
    store.create_job(JobRecord("job-1", None, "req", 0.0, replica="r"))
    latents = torch.randn(1, (512 // 16) ** 2, 64)
    for publisher in (StepPublisher(store, "job-1"), StepPublisher(store, "not-stored")):
        for step in range(1, 9):
            publisher(StepEvent(step, 8, 0, 1, latents, 512, 512))  # never raises, even without a record

    logged = [event for _, event in store.events_after("job-1", 0)]
    assert [e["event"] for e in logged].count("progress") == 8
    assert [e["data"]["step"] for e in logged if e["event"] == "preview"] == [4, 8]
    assert [r.getMessage() for r in caplog.records if "not-stored" in r.getMessage()] == [
        "progress events of job not-stored are not stored: RecordNotFound('not-stored')"
    ]
    store.close()


# --- SSE wire format ----------------------------------------------------------------------------


def parse_sse(stream: bytes) -> list:
    """Decode a byte stream with httpx-sse's decoder (the WHATWG algorithm), line by line."""
    decoder, events = SSEDecoder(), []
    for line in stream.decode("utf-8").splitlines():
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


def test_frame_follows_the_sse_format():
    frame = encode_sse(progress_event(2, 4, 0, 1.0), event_id="7")
    assert frame == b'event: progress\nid: 7\ndata: {"step":2,"steps":4,"image_batch":0,"eta_s":1.0}\n\n'
    (event,) = parse_sse(frame)
    assert event.event == "progress" and event.id == "7"
    assert json.loads(event.data) == {"step": 2, "steps": 4, "image_batch": 0, "eta_s": 1.0}


def test_multiline_data_becomes_one_data_line_each_and_rejoins():
    frame = sse_frame("note", "first\nsecond\r\nthird\rfourth", retry_ms=3000)
    assert frame == b"event: note\nretry: 3000\ndata: first\ndata: second\ndata: third\ndata: fourth\n\n"
    (event,) = parse_sse(frame)
    assert event.data == "first\nsecond\nthird\nfourth" and event.retry == 3000


def test_event_name_and_id_cannot_break_the_frame():
    with pytest.raises(ValueError):
        sse_frame("progress\ndata: forged", "{}")
    with pytest.raises(ValueError):
        sse_frame("progress", "{}", event_id="1\n\nevent: completed")


def test_stream_of_frames_and_keepalives_decodes_in_order():
    error = 'bad "prompt"\nsecond line'
    stream = b"".join(
        [
            KEEPALIVE,
            encode_sse(progress_event(1, 2, 0, None), "1"),
            KEEPALIVE,
            encode_sse(progress_event(2, 2, 0, 0.0), "2"),
            KEEPALIVE,
            encode_sse(failed_event(error), "3"),
        ]
    )
    assert KEEPALIVE == b": keep-alive\n"
    events = parse_sse(stream)
    assert [e.event for e in events] == ["progress", "progress", "failed"]
    assert [e.id for e in events] == ["1", "2", "3"]
    assert json.loads(events[-1].data)["error"] == error  # JSON escapes the line break
