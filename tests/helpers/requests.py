"""What the tests send to `POST /generate/flux-dev`: the path, the async header and a small body."""

from __future__ import annotations

STEPS = 2  # enough to exercise the scheduler; the tiny model is random anyway
URL_PATH = "/generate/flux-dev"
ASYNC = {"X-OctoAI-Async": "1"}


def body(prompt: str, **extra) -> dict:
    """A 512x512 request of STEPS steps with a fixed seed; `extra` adds or overrides fields."""
    return {"prompt": prompt, "width": 512, "height": 512, "steps": STEPS, "seed": 5, **extra}
