"""A server on `--model TINY_DIR --transformer FILE.gguf`: every mode, a LoRA, async and the OpenAI route;
one on an fp8 `--text-encoder-2 FILE` serves that file.

The same requests go to a server on the folder alone: a Q8_0 file gives images close to the folder's
(the bound of tests/unit/pipelines/test_single_file.py), never identical (the file is what is served).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import b64_to_image, gradient_image, image_to_b64, pixels
from helpers.requests import ASYNC, URL_PATH, body
from PIL import Image
from safetensors.torch import load_file, save_file

from octoflux.pipelines.export import export_text_encoder, export_transformer
from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

MIN_PSNR = 40.0  # Q8_0 against the folder, 8-bit pixels (measured: over 50 dB)
T5_FP8_MIN_PSNR = 45.0  # an fp8 T5 file against the folder's T5 (measured: 64.2 dB)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("bf16") / "tiny"
    shutil.copytree(tiny_checkpoint, target)
    for path in [
        *(target / "transformer").glob("*.safetensors"),
        *(target / "text_encoder_2").glob("*.safetensors"),
    ]:
        state = load_file(path)
        save_file({k: v.to(torch.bfloat16).to(torch.float32) for k, v in state.items()}, path)
    return target


@pytest.fixture(scope="module")
def servers(server_factory, folder, tmp_path_factory):
    gguf = export_transformer(folder, tmp_path_factory.mktemp("files") / "tiny-Q8_0.gguf", "gguf:Q8_0", "bfl")
    with (
        server_factory(model=str(folder), warmup=False) as plain,
        server_factory(model=str(folder), transformer=str(gguf), warmup=False) as served,
    ):
        for live in (plain, served):
            save_diffusers(make_lora(1), live.settings.lora_dir / "style.safetensors")
        yield plain, served


def generate(live, **extra) -> np.ndarray:
    response = httpx.post(f"{live.url}{URL_PATH}", json=body("a red fox", **extra), timeout=120)
    assert response.status_code == 200, response.text
    return pixels(b64_to_image(response.json()["images"][0]["image_b64"]))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def inpaint_fields() -> dict:
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (0, 0, 256, 512))
    return {
        "init_image": image_to_b64(gradient_image(512, 512)),
        "mask_image": image_to_b64(mask),
        "strength": 0.9,
    }


MODES = {
    "text2img": {},
    "img2img": {"strength": 0.6},
    "inpaint": None,
}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_on_a_gguf_transformer_is_close_to_the_folders_image(servers, mode):
    plain, served = servers
    extra = inpaint_fields() if mode == "inpaint" else dict(MODES[mode])
    if mode == "img2img":
        extra["init_image"] = image_to_b64(gradient_image(512, 512))
    from_file, from_folder = generate(served, **extra), generate(plain, **extra)
    assert not np.array_equal(from_file, from_folder)
    assert psnr(from_file, from_folder) >= MIN_PSNR


def test_a_lora_applies_to_a_gguf_transformer(servers):
    plain, served = servers
    base = generate(served)
    styled = generate(served, loras={"style": 1.0})
    assert np.abs(styled - base).mean() > 1.0  # about 10 of 255 on the folder (docs: FACTS)
    assert psnr(styled, generate(plain, loras={"style": 1.0})) >= MIN_PSNR


def test_an_async_job_gives_the_sync_image(servers):
    _, served = servers
    with httpx.Client(timeout=120) as client:
        accepted = client.post(f"{served.url}{URL_PATH}", json=body("a red fox"), headers=ASYNC).json()
        deadline = time.monotonic() + 120
        while (status := client.get(accepted["poll_url"]).json())["status"] in ("pending", "running"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        result = client.get(status["response_url"]).json()
    assert np.array_equal(pixels(b64_to_image(result["images"][0]["image_b64"])), generate(served))


def test_the_openai_route_serves_the_gguf_transformer(servers):
    _, served = servers
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.images.generate(prompt="a red fox", size="512x512", extra_body={"steps": 2, "seed": 5})
    assert np.array_equal(pixels(b64_to_image(response.data[0].b64_json)), generate(served))


def test_a_server_on_an_fp8_t5_file_serves_it(servers, server_factory, folder, tmp_path):
    plain, _ = servers
    t5 = export_text_encoder(folder, tmp_path / "t5-fp8.safetensors", "fp8")
    with server_factory(model=str(folder), text_encoder_2=str(t5), warmup=False) as served:
        from_file, from_folder = generate(served), generate(plain)
    assert not np.array_equal(from_file, from_folder)
    assert psnr(from_file, from_folder) >= T5_FP8_MIN_PSNR
