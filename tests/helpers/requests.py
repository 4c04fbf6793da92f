"""What the tests send to `POST /generate/flux-dev`: the path, the async header and a small body."""

from __future__ import annotations

import threading

import httpx

STEPS = 2  # enough to exercise the scheduler; the tiny model is random anyway
URL_PATH = "/generate/flux-dev"
ASYNC = {"X-OctoAI-Async": "1"}
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LORA_DATA = {"asset_type": "lora", "engine": "image/flux-dev", "file_format": "safetensors"}


def body(prompt: str, **extra) -> dict:
    """A 512x512 request of STEPS steps with a fixed seed; `extra` adds or overrides fields."""
    return {"prompt": prompt, "width": 512, "height": 512, "steps": STEPS, "seed": 5, **extra}


def post_in_thread(url: str, payload: dict, results: dict, key: str, timeout: float = 30) -> threading.Thread:
    """POST `payload` to `url`'s generate route on a thread; the response lands in `results[key]`."""

    def send():
        results[key] = httpx.post(f"{url}{URL_PATH}", json=payload, timeout=timeout)

    thread = threading.Thread(target=send)
    thread.start()
    return thread
