"""Every ```python and ```bash block in README.md runs as pasted against a live tiny server.

Convention: a block preceded by the line `<!-- not-run -->` is not an example to run (installing,
Docker) and is skipped; one preceded by `<!-- schnell -->` runs against a `--model tiny-schnell`
server, in a namespace of its own, and one preceded by `<!-- family -->` against `--model tiny-family`. The
Python blocks run in order in one namespace, as one reader pasting them
into one session; the base URL is the only thing changed. LoRA files the examples name are written
first, as a reader would have them.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

README = Path(__file__).resolve().parents[2] / "README.md"
NOT_RUN = "<!-- not-run -->"
SCHNELL = "<!-- schnell -->"
FAMILY = "<!-- family -->"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>python|bash)\n(?P<code>.*?)\n```", re.S)
README_URL = "http://127.0.0.1:8000"


def readme_blocks(lang: str, marker: str = "") -> list[str]:
    """The blocks of `lang` preceded by `marker` (no marker: the plain examples)."""
    blocks = []
    for match in BLOCK.finditer(README.read_text()):
        before = match["before"].strip()
        before = before if before in (NOT_RUN, SCHNELL, FAMILY) else ""
        if match["lang"] == lang and before == marker:
            blocks.append(match["code"])
    return blocks


def write_pictures(folder: Path) -> None:
    """fox.png and mask.png, which the OpenAI edit examples send (transparent: repaint)."""
    from PIL import Image

    Image.new("RGB", (512, 512), (200, 90, 30)).save(folder / "fox.png")
    mask = Image.new("RGBA", (512, 512), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (256, 0, 512, 512))
    mask.save(folder / "mask.png")


def test_the_readme_has_examples_and_marks_the_rest():
    assert len(readme_blocks("python")) >= 3 and len(readme_blocks("bash")) >= 1
    assert readme_blocks("python", SCHNELL) and readme_blocks("bash", SCHNELL)
    skipped = [m for m in BLOCK.finditer(README.read_text()) if m["before"].strip() == NOT_RUN]
    assert any("docker" in m["code"] for m in skipped) and any("make serve" in m["code"] for m in skipped)


@pytest.fixture(scope="module")
def readme_server(server_factory, tmp_path_factory):
    loras = tmp_path_factory.mktemp("readme-loras")
    save_diffusers(make_lora(21), loras / "my-style.safetensors")
    save_diffusers(make_lora(22, text_encoder=True), loras / "detail.safetensors")
    with server_factory(lora_dir=loras, warmup=False) as live:
        yield live


@pytest.mark.timeout(600)
def test_python_examples_run_as_pasted(readme_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_diffusers(make_lora(23), tmp_path / "watercolour.safetensors")  # the file the upload example sends
    write_pictures(tmp_path)
    monkeypatch.setenv("OCTOFLUX_WEBHOOK_SECRET", "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=")
    namespace: dict = {}
    for code in readme_blocks("python"):
        assert README_URL in code or "URL" in namespace, "the first Python block defines the base URL"
        exec(compile(code.replace(README_URL, readme_server.url), str(README), "exec"), namespace)
    assert (tmp_path / "inpainted.png").read_bytes().startswith(b"\x89PNG")
    # The upload example created the asset, then deleted it: the file came and went.
    assert namespace["asset"].name == "watercolour"
    assert not (readme_server.settings.lora_dir / "watercolour.safetensors").exists()


@pytest.mark.timeout(300)
def test_curl_examples_run_as_pasted(readme_server, tmp_path):
    blocks = [code for code in readme_blocks("bash") if "curl" in code]
    assert blocks
    write_pictures(tmp_path)
    for code in blocks:
        run_curl(code, readme_server.url, tmp_path)
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")


def run_curl(code: str, url: str, folder: Path) -> None:
    env = {**os.environ, "OCTOAI_TOKEN": "any-token"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code.replace(README_URL, url)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"detail"' not in done.stdout and '"error"' not in done.stdout, done.stdout


@pytest.mark.timeout(300)
def test_schnell_examples_run_against_a_schnell_server(server_factory, tmp_path):
    with server_factory(model="tiny-schnell", tiny_dir=tmp_path / "tiny", warmup=False) as live:
        namespace: dict = {}
        for code in readme_blocks("python", SCHNELL):
            exec(compile(code.replace(README_URL, live.url), str(README), "exec"), namespace)
        for code in readme_blocks("bash", SCHNELL):
            run_curl(code, live.url, tmp_path)


@pytest.mark.timeout(300)
def test_family_examples_run_against_a_family_server(server_factory, tmp_path, monkeypatch):
    assert readme_blocks("python", FAMILY) and readme_blocks("bash", FAMILY)
    monkeypatch.chdir(tmp_path)
    write_pictures(tmp_path)
    with server_factory(model="tiny-family", tiny_dir=tmp_path / "tiny-flux", warmup=False) as live:
        namespace: dict = {}
        for code in readme_blocks("python", FAMILY):
            exec(compile(code.replace(README_URL, live.url), str(README), "exec"), namespace)
        assert namespace["edited"].size == "512x512" and namespace["filled"].size == "512x512"
        for code in readme_blocks("bash", FAMILY):
            run_curl(code, live.url, tmp_path)
    from PIL import Image

    assert Image.open(tmp_path / "wide.png").size == (1024, 576)
