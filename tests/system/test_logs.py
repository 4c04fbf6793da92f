"""A real `octoflux serve` process: a few readable startup lines, and prompts only with log_prompt."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from helpers.engine_control import wait_until
from helpers.services import free_port

from octoflux.deploy.log_setup import LibraryFilter

ROOT = Path(__file__).resolve().parents[2]
MAX_STARTUP_LINES = 8


def long_prompt(marker: str) -> str:
    """Over 600 characters, past CLIP's 77 tokens, the marker at the end (the part that gets truncated)."""
    return "a watercolour of a lighthouse on a cliff at dusk, gulls, waves, " * 10 + marker


@pytest.mark.timeout(300)
def test_startup_is_short_and_prompts_stay_out_of_the_output(tiny_checkpoint, tmp_path):
    port = free_port()
    out_path = tmp_path / "server.out"
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--model", tiny_checkpoint, "--device", "cpu"]
    command += ["--port", str(port), "--warmup-steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    with open(out_path, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    private, logged = f"private{uuid.uuid4().hex}", f"logged{uuid.uuid4().hex}"
    try:
        wait_until(
            lambda: "ready on" in out_path.read_text() or process.poll() is not None,
            timeout=240,
            what="ready",
        )
        startup = out_path.read_text().splitlines()
        for marker, log_prompt in ((private, False), (logged, True)):
            body = {
                "prompt": long_prompt(marker),
                "width": 512,
                "height": 512,
                "steps": 1,
                "log_prompt": log_prompt,
            }
            assert httpx.post(f"{url}/generate/flux-dev", json=body, timeout=120).status_code == 200
    finally:
        process.terminate()
        process.wait(60)
    output = out_path.read_text()
    assert len(startup) <= MAX_STARTUP_LINES, "\n".join(startup)
    assert startup[-1].endswith(f"ready on http://127.0.0.1:{port}")
    assert any(f"loading {tiny_checkpoint} on cpu" in line for line in startup)
    assert not any("it/s]" in line or "Traceback" in line for line in output.splitlines())
    assert private not in output
    access = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in access if "prompt" in line] == [long_prompt(logged)]
    # The truncation diffusers warned about (quoting the prompt's tail) is said once, in our words.
    assert output.count("longer than a text encoder's token limit") == 1


def record(name: str, msg: str, *args, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_library_records_are_translated_once_or_dropped_below_error():
    keep = LibraryFilter()
    truncated = "The following part of your input was truncated because CLIP can only handle 77 tokens: %s"
    first = record("diffusers.pipelines.flux.pipeline_flux", truncated, "secret tail")
    assert keep.filter(first) and "secret tail" not in first.getMessage()
    assert not keep.filter(record("diffusers.pipelines.flux.pipeline_flux", truncated, "secret tail"))
    assert not keep.filter(record("transformers.models.clip", "should be kept in float32"))
    assert not keep.filter(record("py.warnings", "torchvision is not installed"))
    assert keep.filter(record("diffusers.loaders", "could not load", level=logging.ERROR))
    assert not keep.filter(record("transformers", "input was truncated: %s", "secret", level=logging.ERROR))
    assert keep.filter(record("octoflux.app", "loading %s", "/models/x"))
