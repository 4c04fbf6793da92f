"""Prometheus metrics, X-Request-ID, and one structured JSON log line per request."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest
from helpers.engine_control import wait_until
from helpers.requests import STEPS, URL_PATH, body


@pytest.fixture(scope="module")
def server(server_factory):
    with server_factory(warmup=False) as live:
        yield live


def scrape(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def generate(server, headers: dict | None = None, **extra) -> httpx.Response:
    return httpx.post(
        f"{server.url}{URL_PATH}", json=body("a kite", seed=2, **extra), timeout=60, headers=headers
    )


def test_metrics_count_queue_latency_images_steps_and_errors(server):
    before = scrape(server)
    assert generate(server, num_images=2).status_code == 200
    assert httpx.post(f"{server.url}{URL_PATH}", json={"prompt": ""}).status_code == 422
    after = scrape(server)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('octoflux_images_generated_total{mode="text2img"}') == 2
    assert grew('octoflux_request_seconds_count{api="sync",mode="text2img"}') == 1
    assert grew('octoflux_queue_wait_seconds_count{api="sync",mode="text2img"}') == 1
    assert grew("octoflux_denoising_step_seconds_count") == STEPS - 1
    assert grew('octoflux_errors_total{kind="validation"}') == 1
    for gauge in ("octoflux_queue_depth", "octoflux_jobs_in_flight", "process_resident_memory_bytes"):
        assert gauge in after
    assert "octoflux_lora_cache_hits_total" in after and "octoflux_lora_cache_misses_total" in after


def test_request_id_is_echoed_or_generated_on_every_response(server):
    echoed = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    generated = httpx.get(f"{server.url}/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    hostile = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "x" * 500})
    assert hostile.headers["x-request-id"] != "x" * 500
    for response in (
        httpx.post(f"{server.url}{URL_PATH}", json={"prompt": 5}),
        httpx.post(f"{server.url}{URL_PATH}", content=b"x" * (65 * 2**20)),
        httpx.get(f"{server.url}/no-such-page"),
    ):
        assert response.headers["x-request-id"]


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "octoflux.access"]


def wait_logged(caplog, *request_ids: str) -> None:
    """Wait for the access lines of these requests: the server writes a request's line after it has
    sent the response, on its own thread, so the client can hold the response before the line exists."""

    def logged() -> bool:
        seen = {line["request_id"] for line in access_lines(caplog)}
        return all(request_id in seen for request_id in request_ids)

    wait_until(logged, what=f"the access log lines of {', '.join(request_ids)}")


def test_one_json_log_line_per_request_with_the_job_figures(server, caplog):
    caplog.set_level(logging.INFO, logger="octoflux.access")
    response = generate(server, headers={"X-Request-ID": "log-me"})
    assert response.status_code == 200
    wait_logged(caplog, "log-me")
    lines = [line for line in access_lines(caplog) if line["request_id"] == "log-me"]
    assert len(lines) == 1
    line = lines[0]
    assert line["status"] == 200 and line["mode"] == "text2img" and line["api"] == "sync"
    assert (line["width"], line["height"], line["steps"], line["images"]) == (512, 512, STEPS, 1)
    for figure in ("queue_wait_ms", "gpu_ms", "encode_ms", "duration_ms"):
        assert line[figure] >= 0
    assert "prompt" not in line


def test_prompt_is_logged_only_when_the_request_asks(server, caplog):
    caplog.set_level(logging.INFO, logger="octoflux.access")
    payload = {"prompt": "secret recipe", "width": 512, "height": 512, "steps": 1, "log_prompt": True}
    httpx.post(f"{server.url}{URL_PATH}", json=payload, headers={"X-Request-ID": "with-prompt"}, timeout=60)
    payload["log_prompt"] = False
    httpx.post(f"{server.url}{URL_PATH}", json=payload, headers={"X-Request-ID": "without"}, timeout=60)
    wait_logged(caplog, "with-prompt", "without")
    lines = {line["request_id"]: line for line in access_lines(caplog)}
    assert lines["with-prompt"]["prompt"] == "secret recipe"
    assert "prompt" not in lines["without"]
    assert "secret recipe" not in caplog.text.replace(json.dumps(lines["with-prompt"]), "")


def test_errors_are_logged_with_their_kind(server, caplog):
    caplog.set_level(logging.INFO, logger="octoflux.access")
    httpx.post(
        f"{server.url}{URL_PATH}", json={"prompt": "x", "steps": "30"}, headers={"X-Request-ID": "bad"}
    )
    wait_logged(caplog, "bad")
    line = next(line for line in access_lines(caplog) if line["request_id"] == "bad")
    assert line["status"] == 422 and line["error"] == "validation"
