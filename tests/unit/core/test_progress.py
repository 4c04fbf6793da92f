"""Live progress pieces: latent previews, progress events with an ETA, and the SSE wire format."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from diffusers import FluxPipeline
from httpx_sse._decoders import SSEDecoder
from PIL import Image

from octoflux.core.progress import (
    HEARTBEAT,
    StepClock,
    cancelled_event,
    completed_event,
    encode_sse,
    failed_event,
    final_event,
    preview_event,
    progress_event,
    sse_frame,
)
from octoflux.pipelines.engine import Engine, GenerationSpec, StepEvent
from octoflux.pipelines.preview import (
    FLUX_LATENT_RGB_BIAS,
    FLUX_LATENT_RGB_FACTORS,
    latents_to_rgb,
    preview_data_url,
)

DATA_URL_PREFIX = "data:image/jpeg;base64,"


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith(DATA_URL_PREFIX)
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix(DATA_URL_PREFIX))))
    image.load()
    return image


def parse_sse(stream: bytes) -> list:
    """Decode a byte stream with httpx-sse's decoder (the WHATWG algorithm), line by line."""
    decoder, events = SSEDecoder(), []
    for line in stream.decode("utf-8").splitlines():
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


def reference_projection(packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """diffusers' own unpacking, then the 16->3 matrix per latent pixel: [B, H/8, W/8, 3] in [-1, 1]-ish."""
    unpacked = FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=8)  # [B, 16, h, w]
    factors = torch.tensor(FLUX_LATENT_RGB_FACTORS)
    return torch.einsum("bchw,ck->bhwk", unpacked, factors) + torch.tensor(FLUX_LATENT_RGB_BIAS)


# --- Preview ------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(1024, 1024), (1536, 640), (512, 768)])
def test_preview_is_a_small_jpeg_of_the_output_aspect(width, height):
    latents = torch.randn(2, (width // 16) * (height // 16), 64)
    image = decode_data_url(preview_data_url(latents, width, height))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert max(image.size) == 256
    assert image.size[0] / image.size[1] == pytest.approx(width / height, rel=0.02)


def test_projection_matches_diffusers_unpacking():
    width, height = 512, 256
    latents = torch.randn(2, (width // 16) * (height // 16), 64)
    expected = reference_projection(latents, width, height)
    for index in (0, 1):
        pixels = latents_to_rgb(latents, width, height, index)
        assert pixels.shape == (height // 8, width // 8, 3) and pixels.dtype == torch.uint8
        want = ((expected[index] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
        assert torch.equal(pixels, want)


def test_preview_keeps_the_layout_of_the_image():
    # A bright top-left quadrant in the unpacked latent image stays top-left in the preview.
    width = height = 512
    unpacked = torch.zeros(1, 16, height // 8, width // 8)
    unpacked[:, 12, : height // 16, : width // 16] = 8.0  # channel 12 projects to grey (+, +, +)
    packed = FluxPipeline._pack_latents(unpacked, 1, 16, height // 8, width // 8)
    preview = decode_data_url(preview_data_url(packed, width, height))
    top_left = sum(preview.getpixel((32, 32)))
    bottom_right = sum(preview.getpixel((224, 224)))
    assert top_left > bottom_right + 200
    # Zero latents show the bias colour ((bias + 1) / 2 * 255), give or take JPEG rounding.
    expected = [round((b + 1) / 2 * 255) for b in FLUX_LATENT_RGB_BIAS]
    assert all(abs(got - want) <= 3 for got, want in zip(preview.getpixel((224, 224)), expected, strict=True))


def test_preview_refuses_latents_of_another_size():
    with pytest.raises(ValueError, match="do not fit a 1024x1024 image"):
        latents_to_rgb(torch.zeros(1, 1024, 64), 1024, 1024)


def test_previews_and_progress_from_the_tiny_engine(load_tiny, tiny_checkpoint):
    engine = Engine(load_tiny(), max_batch=1)
    spec = GenerationSpec(prompt="a lighthouse", width=512, height=256, steps=3, guidance=3.5, seeds=[1, 2])
    clock, progress, previews = StepClock(), [], []

    def on_step(event: StepEvent) -> None:
        clock.step(event.step, event.image_batch)
        eta = clock.eta_s(event.step, event.steps, event.image_batch, event.batches)
        progress.append(progress_event(event.step, event.steps, event.image_batch, eta).data)
        url = preview_data_url(event.latents, event.width, event.height)
        previews.append(preview_event(event.step, event.steps, event.image_batch, url))

    engine.generate(spec, on_step=on_step)
    assert [(p["image_batch"], p["step"]) for p in progress] == [(b, s) for b in (0, 1) for s in (1, 2, 3)]
    assert all(p["steps"] == 3 for p in progress)
    assert progress[0]["eta_s"] is None  # nothing measured yet
    # Measured from step 2 on (its value, rounded to 0.1 s, is 0.0 when the tiny model is fast; the
    # arithmetic is checked with fixed times below); nothing is left after the last step.
    assert progress[1]["eta_s"] is not None and clock.step_seconds > 0 and progress[-1]["eta_s"] == 0
    assert all(decode_data_url(p.data["image"]).size == (256, 128) for p in previews)


# --- Events and ETA -----------------------------------------------------------------------------


def test_progress_event_fields():
    event = progress_event(step=3, steps=28, image_batch=1, eta_s=12.345)
    assert event.event == "progress" and not event.final
    assert event.data == {"step": 3, "steps": 28, "image_batch": 1, "eta_s": 12.3}
    assert progress_event(1, 28, 0, None).data["eta_s"] is None


def test_final_events_carry_url_error_or_nothing():
    assert completed_event("https://h/v1/responses/abc").data == {
        "status": "completed",
        "response_url": "https://h/v1/responses/abc",
    }
    assert failed_event("out of memory").data == {"status": "failed", "error": "out of memory"}
    assert cancelled_event().data == {"status": "cancelled"}
    assert all(e.final for e in (completed_event("u"), failed_event("x"), cancelled_event()))
    assert final_event("failed", error="boom") == failed_event("boom")
    assert final_event("completed", response_url="u") == completed_event("u")
    with pytest.raises(ValueError):
        final_event("running")


def test_eta_comes_from_the_measured_step_time():
    clock = StepClock()
    clock.step(1, 0, now=100.0)  # the first step includes prompt encoding: not a step interval
    assert clock.eta_s(1, 10, 0, 2) is None
    clock.step(2, 0, now=100.5)
    clock.step(3, 0, now=101.0)
    assert clock.step_seconds == pytest.approx(0.5)
    # 7 steps left in batch 0 and 10 in batch 1 at 0.5 s each.
    assert clock.eta_s(3, 10, 0, 2) == pytest.approx(8.5)
    clock.step(1, 1, now=110.0)  # a new batch: the gap (decode, next prompt) is not a step
    assert clock.step_seconds == pytest.approx(0.5)
    assert clock.eta_s(10, 10, 1, 2) == 0


# --- SSE wire format ----------------------------------------------------------------------------


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


def test_stream_of_frames_and_heartbeats_decodes_in_order():
    error = 'bad "prompt"\nsecond line'
    stream = b"".join(
        [
            HEARTBEAT,
            encode_sse(progress_event(1, 2, 0, None), "1"),
            HEARTBEAT,
            encode_sse(progress_event(2, 2, 0, 0.0), "2"),
            HEARTBEAT,
            encode_sse(failed_event(error), "3"),
        ]
    )
    assert HEARTBEAT == b": keep-alive\n"
    events = parse_sse(stream)
    assert [e.event for e in events] == ["progress", "progress", "failed"]
    assert [e.id for e in events] == ["1", "2", "3"]
    assert json.loads(events[-1].data)["error"] == error  # JSON escapes the line break
