"""The playground page at `/`, driven in headless Chromium over a live server; and CORS over HTTP.

The browser is Debian's `chromium` driven by the `playwright` package. Where either is missing
the browser tests skip with the reason printed; under CI=true that is a failure instead.
Each flow saves a screenshot under test-artifacts/playground/.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import gradient_image, pixels
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageFilter

from octoflux.api.common.cors import install_cors
from octoflux.core.errors import JobCancelled
from octoflux.core.models import SUPPORTED_RESOLUTIONS
from octoflux.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
STATIC = ROOT / "octoflux" / "static" / "playground"
ARTIFACTS = ROOT / "test-artifacts" / "playground"
DOCS_SCREENSHOT = ROOT / "docs" / "playground.png"
CHROMIUM = Path(os.environ.get("OCTOFLUX_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "test-key"
ALLOWED_ORIGIN = "https://app.example"
LORA = "tiny-style"
STEPS = 2
TIMEOUT_MS = 60_000
# Chromium logs every 4xx a fetch() gets as a console error; those the flows expect are not script errors.
HTTP_STATUS_LOG = re.compile(r"^Failed to load resource: the server responded with a status of (\d+)")


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run under CI=true: {reason}")
    print(f"\nskipping the playground browser tests: {reason}")
    pytest.skip(reason)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set OCTOFLUX_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    """Keys on (the token flow is real), one LoRA in the folder, a queue of one, CORS for one origin."""
    from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

    lora_dir = tmp_path_factory.mktemp("playground-loras")
    save_diffusers(make_lora(seed=1), lora_dir / f"{LORA}.safetensors")
    with server_factory(api_keys=TOKEN, lora_dir=lora_dir, max_queue=1, cors_origins=ALLOWED_ORIGIN) as live:
        yield live


class Playground:
    """One page on the playground, with what it sent and every script error it logged."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.problems: list[str] = []
        self.generate_requests: list = []
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("console", self._console)
        page.on("request", self._request)
        page.set_default_timeout(TIMEOUT_MS)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        status = HTTP_STATUS_LOG.match(message.text)
        if status and int(status.group(1)) < 500:
            return
        self.problems.append(f"console error: {message.text} at {message.location}")

    def _request(self, request) -> None:
        if request.method == "POST" and request.url.endswith("/generate/flux-dev"):
            self.generate_requests.append(request)

    def open(self, token: str = TOKEN) -> None:
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("body[data-ready=true]", state="attached")
        self.page.fill("#token", token)
        self.page.press("#token", "Tab")  # "change": the page lists the LoRAs with this token

    def settings(
        self, prompt: str, size: str = "512x512", steps: int = STEPS, seed: int | None = None
    ) -> None:
        self.page.fill("#prompt", prompt)
        self.page.select_option("#size", size)
        self.page.fill("#steps", str(steps))
        if seed is None:
            self.page.check("#random-seed")
        else:
            self.page.uncheck("#random-seed")
            self.page.fill("#seed", str(seed))

    def runs(self) -> int:
        return self.page.locator("#gallery .run").count()

    def generate(self, how: str = "click"):
        """Generate and wait for the new run in the gallery; its first figure."""
        before = self.runs()
        if how == "click":
            self.page.click("#generate")
        elif how == "enter":
            self.page.press("#prompt", "Enter")
        else:
            self.page.press("#steps", "Control+Enter")
        self.page.wait_for_function("n => document.querySelectorAll('#gallery .run').length > n", arg=before)
        # Pinned to this run: later runs are put before it.
        figure = self.page.locator(f'#gallery .run[data-run="{before + 1}"] figure.result').first
        figure.locator("img").evaluate("img => img.decode()")
        return figure

    def last_body(self) -> dict:
        return self.generate_requests[-1].post_data_json

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def playground(browser, server, request):
    """A fresh page; afterwards its screenshot is saved and it must have logged no script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    started = time.monotonic()
    current = Playground(context.new_page(), server.url)
    try:
        yield current
        current.screenshot(request.node.name)
    finally:
        context.close()
        print(f"\n{request.node.name}: {time.monotonic() - started:.1f} s in the browser")
    assert current.problems == []


def image_of(figure) -> Image.Image:
    src = figure.locator("img").get_attribute("src")
    header, _, data = src.partition(",")
    assert header.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def decode_b64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def save_docs_screenshot(page) -> None:
    """docs/playground.png, small enough to commit: 1000 px wide, 256 colours."""
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    shot = shot.resize((1000, round(shot.height * 1000 / shot.width)), Image.Resampling.LANCZOS)
    shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(DOCS_SCREENSHOT, optimize=True)


# ------------------------------------------------------------------ static files, no browser


def test_page_sizes_are_the_servers_supported_resolutions():
    listed = re.findall(r"\[(\d+), (\d+), \"[^\"]+\"\]", (STATIC / "app.js").read_text())
    assert [(int(w), int(h)) for w, h in listed] == list(SUPPORTED_RESOLUTIONS)


def test_page_and_its_files_are_served_without_a_token(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (
        ("app.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("style.css", "text/css"),
    ):
        response = httpx.get(f"{server.url}/playground/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
    # Nothing but the page's own files: no other suffixes, no way out of the folder.
    for path in ("/playground/nope.js", "/playground/..%2Fsettings.py", "/playground/.hidden.js"):
        assert httpx.get(server.url + path).status_code == 404
    # The page links no other host (no CDN): every script and stylesheet is one of ours.
    html = page.text
    assert "http://" not in html and "https://" not in html


def test_playground_files_are_package_data():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["octoflux"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "octoflux").glob(pattern)}
    assert shipped == {p.name for p in STATIC.iterdir() if p.is_file()}


# ------------------------------------------------------------------ browser flows


def test_generate_shows_the_image_with_its_seed_and_the_seed_is_reusable(playground):
    page = playground.page
    playground.open()
    playground.settings("a red boat on a calm lake")
    first = playground.generate(how="enter")  # Enter in the prompt generates
    seed = int(first.get_attribute("data-seed"))
    assert first.locator(".seed").inner_text() == f"seed {seed}"
    assert first.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [512, 512]
    assert first.locator("a[download]").get_attribute("download") == f"octoflux-{seed}.png"
    sent = playground.generate_requests[-1]
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["x-octoai-async"] == "1"
    assert "seed" not in sent.post_data_json  # random: the server draws it and reports it
    # The token stays in the tab: in no URL and not in storage that outlives it.
    assert page.evaluate("localStorage.length") == 0
    assert TOKEN not in page.url

    first.locator(".reuse-seed").click()
    assert page.input_value("#seed") == str(seed)
    again = playground.generate(how="ctrl+enter")
    assert playground.last_body()["seed"] == seed
    assert int(again.get_attribute("data-seed")) == seed
    assert np.array_equal(pixels(image_of(again)), pixels(image_of(first)))
    if os.environ.get("OCTOFLUX_DOCS_SCREENSHOT"):
        save_docs_screenshot(page)

    again.locator(".use-init").click()  # the result becomes the next init image
    page.wait_for_selector("#init-view:not([hidden])")
    assert page.get_attribute("#init-preview", "src") == again.locator("img").get_attribute("src")
    assert page.is_checked('input[name="mode"][value="image"]')


def test_changing_the_size_changes_the_image_size(playground):
    playground.open()
    for size, encoding in (("1024x576", "png"), ("576x1024", "jpeg")):
        playground.settings("a tall tower", size=size)
        playground.page.check(f'input[name="encoding"][value="{encoding}"]')
        figure = playground.generate()
        width, height = (int(v) for v in size.split("x"))
        assert figure.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [width, height]
        assert figure.locator(".dims").inner_text() == f"{width} × {height}"
        assert image_of(figure).format == encoding.upper()


def test_inpaint_with_a_painted_mask_keeps_the_pixels_outside_it(playground, tmp_path):
    page = playground.page
    init = gradient_image(512, 512)
    init.save(tmp_path / "init.png")
    playground.open()
    page.check('input[name="mode"][value="inpaint"]')
    page.set_input_files("#init-file", str(tmp_path / "init.png"))
    page.wait_for_selector("#init-view:not([hidden])")
    playground.settings("a blue square", seed=5)  # after the image: it picked 1024x1024 for 1:1
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.65, box["y"] + box["height"] * 0.25)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.75, steps=12)
    page.mouse.up()
    figure = playground.generate()

    body = playground.last_body()
    assert body["init_image"] == base64.b64encode((tmp_path / "init.png").read_bytes()).decode()
    mask = decode_b64(body["mask_image"])
    assert (mask.format, mask.size) == ("PNG", init.size)
    values = np.asarray(mask.convert("L"))
    assert set(np.unique(values)) == {0, 255}  # black keeps, white repaints, nothing between
    assert values[:, :256].max() == 0 and 0.03 < (values == 255).mean() < 0.3

    result = pixels(image_of(figure))
    # Keep a margin around the stroke: the pipeline feathers the mask's edge over a few pixels.
    near_mask = np.asarray(mask.convert("L").filter(ImageFilter.MaxFilter(17))) > 0
    assert np.array_equal(result[~near_mask], pixels(init)[~near_mask])
    assert np.any(result[values == 255] != pixels(init)[values == 255], axis=-1).mean() > 0.9


def test_picking_a_lora_sends_it_and_changes_the_image(playground):
    page = playground.page
    playground.open()
    item = page.locator(f'.lora-item[data-name="{LORA}"]')
    item.wait_for()
    playground.settings("a portrait", seed=7)
    plain = playground.generate()
    assert "loras" not in playground.last_body()
    item.locator(".lora-use").check()
    with_lora = playground.generate()
    assert playground.last_body()["loras"] == {LORA: 1.0}
    assert int(with_lora.get_attribute("data-seed")) == 7
    difference = np.abs(pixels(image_of(with_lora)) - pixels(image_of(plain))).mean()
    assert difference > 1.0


def test_uploaded_lora_becomes_ready_and_a_broken_one_is_rejected_with_the_reason(playground, tmp_path):
    from octoflux.pipelines.tiny_lora import make_lora, save_diffusers

    page = playground.page
    good = save_diffusers(make_lora(seed=2), tmp_path / "uploaded.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    playground.open()
    page.click(".upload summary")
    page.set_input_files("#lora-file", str(good))
    page.click("#lora-upload")
    page.wait_for_selector("#lora-upload-status:has-text('is ready')")
    page.locator('.lora-item[data-name="uploaded"]').wait_for()

    page.set_input_files("#lora-file", str(broken))
    page.fill("#lora-name", "broken-one")
    page.press("#lora-name", "Enter")  # uploads; does not generate
    status = page.locator("#lora-upload-status:has-text('was rejected')")
    status.wait_for()
    assert len(status.inner_text()) > len("“broken-one” was rejected: ") + 5  # the reason is shown
    assert "rejected" in page.locator("li.lora-other", has_text="broken-one").inner_text()
    assert playground.generate_requests == []


def test_the_page_shows_the_key_in_use_and_its_limits(playground):
    page = playground.page
    playground.open()
    name = f"key-{hashlib.sha256(TOKEN.encode()).hexdigest()[:8]}"
    page.wait_for_selector(f"#key-info:has-text('{name}')")
    assert page.inner_text("#key-info") == f"Key “{name}” · assets, generate, metrics · no limits"
    assert TOKEN not in page.inner_text("body")


def test_a_bad_token_is_reported_next_to_the_token_field(playground):
    page = playground.page
    playground.open(token="not-the-key")
    page.wait_for_selector("#token-error:has-text('refused')")
    playground.settings("anything")
    page.click("#generate")
    page.wait_for_function("() => !document.getElementById('generate').disabled")
    assert "refused this token (401)" in page.inner_text("#token-error")
    assert page.get_attribute("#token", "aria-invalid") == "true"
    assert playground.runs() == 0


def test_a_422_is_shown_next_to_the_field_it_names(playground):
    page = playground.page
    playground.open()
    playground.settings("anything", steps=500)
    page.click("#generate")
    error = page.locator("#steps-error")
    error.wait_for()
    assert "200" in error.inner_text()  # pydantic's "less than or equal to 200", in words
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    assert page.locator("#banner").is_hidden()


def _long_job(server, **overrides) -> str:
    body = {"prompt": "long", "steps": 200, "num_images": 4, "width": 512, "height": 512, **overrides}
    response = httpx.post(
        f"{server.url}/generate/flux-dev",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}", "X-OctoAI-Async": "1"},
    )
    assert response.status_code == 202, response.text
    return response.json()["response_id"]


def _poll(server, response_id: str) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.get(f"{server.url}/v1/responses/{response_id}", headers=headers).json()


def _status(server, response_id: str) -> str:
    return _poll(server, response_id)["status"]


def test_cancel_stops_a_running_job(playground, server):
    page = playground.page
    playground.open()
    playground.settings("a long one", steps=200)
    page.fill("#num-images", "4")
    with page.expect_response("**/generate/flux-dev") as accepted:
        page.click("#generate")
    response_id = accepted.value.json()["response_id"]
    page.wait_for_selector("#status:text-matches('Running|Step')")
    job = server.service.jobs.running  # the worker's job: the record alone says nothing of the worker
    assert job is not None and job.id == response_id
    page.click("#cancel")
    page.wait_for_selector("#status:has-text('Cancelled.')", timeout=15_000)
    assert _status(server, response_id) == "cancelled"
    # The worker stopped it at its next step (800 steps would take far longer), not just the record.
    stopped = job.future.exception(timeout=10)
    assert isinstance(stopped, JobCancelled) and stopped.started, stopped
    assert playground.runs() == 0
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_a_full_queue_shows_a_busy_banner_with_the_wait(playground, server):
    page = playground.page
    # The page is ready before the queue fills: loading it takes seconds on a slow machine, and the
    # running job must not have finished (letting the waiting one out of the queue) by the click.
    playground.open()
    playground.settings("one too many")
    running = _long_job(server)
    waiting = None
    try:
        deadline = time.monotonic() + 30
        while _status(server, running) != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = _long_job(server)  # the queue holds one: the page's request is the one too many
        with page.expect_response("**/generate/flux-dev") as refused:
            page.click("#generate")
        assert refused.value.status == 429
        wait = int(refused.value.headers["retry-after"])
        banner = page.locator("#banner")
        banner.wait_for()
        assert re.fullmatch(r"The server is busy: retry in \d+ s\.", banner.inner_text())
        assert int(re.search(r"\d+", banner.inner_text()).group()) <= wait
    finally:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for response_id in (waiting, running):
            if response_id:
                httpx.delete(f"{server.url}/v1/responses/{response_id}", headers=headers)


def test_page_follows_the_event_stream_when_the_server_has_one(playground, server):
    """The events endpoint answered in the browser (its format), over the real job: no polling then."""
    page = playground.page
    stream_requests, polls = [], []

    def events(route):
        stream_requests.append(route.request)
        response_id = route.request.url.split("/v1/responses/")[1].split("/")[0]
        deadline = time.monotonic() + 30
        while (state := _poll(server, response_id))["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.05)
        preview = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(preview, format="JPEG")
        preview_url = "data:image/jpeg;base64," + base64.b64encode(preview.getvalue()).decode()
        body = "".join(
            f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n"
            for name, data in (
                ("progress", {"step": 1, "steps": STEPS, "image_batch": 0, "eta_s": 0.1}),
                ("preview", {"image": preview_url}),
                ("progress", {"step": STEPS, "steps": STEPS, "image_batch": 0, "eta_s": 0}),
                ("completed", {"response_url": state["response_url"]}),
            )
        )
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/responses/*/events*", events)
    page.on("request", lambda r: polls.append(r.url) if re.search(r"/v1/responses/[^/]+$", r.url) else None)
    playground.open()
    page.check("#previews")
    playground.settings("streamed", seed=11)
    figure = playground.generate()
    assert int(figure.get_attribute("data-seed")) == 11
    (stream,) = stream_requests
    assert stream.url.endswith("/events?preview=1")
    assert stream.headers["authorization"] == f"Bearer {TOKEN}"  # why the page reads it with fetch()
    assert polls == []


def test_event_stream_parser_splits_events_across_chunks(playground):
    """The SSE reader the page uses for progress: CRLF split over chunks, comments, multi-line data."""
    playground.page.goto(playground.url + "/")
    events = playground.page.evaluate(
        """async () => {
            const { sseEvents } = await import("/playground/api.js");
            const chunks = ["event: progress\\r", "\\ndata: {\\"step\\":1}\\r\\n\\r", "\\n: keep-alive\\n",
                            "data: a\\nda", "ta: b\\n\\nevent: completed\\ndata: {}\\n\\n"];
            const stream = new ReadableStream({
                start(controller) {
                    const encoder = new TextEncoder();
                    for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
                    controller.close();
                },
            });
            const out = [];
            for await (const event of sseEvents(stream)) out.push(event);
            return out;
        }"""
    )
    assert events == [
        {"event": "progress", "data": '{"step":1}'},
        {"event": "message", "data": "a\nb"},
        {"event": "completed", "data": "{}"},
    ]


def test_narrow_window_stacks_the_controls_above_the_results(playground):
    page = playground.page
    page.set_viewport_size({"width": 380, "height": 800})
    playground.open()
    controls = page.locator("#generate-form").bounding_box()
    results = page.locator(".results").bounding_box()
    assert results["y"] >= controls["y"] + controls["height"]
    assert controls["width"] <= 380
    assert page.evaluate("document.documentElement.scrollWidth") <= 380  # no sideways scrolling


# ------------------------------------------------------------------ CORS over plain HTTP


def test_cors_preflight_from_an_allowed_origin_passes(server):
    response = httpx.options(
        f"{server.url}/generate/flux-dev",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-octoai-async",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-octoai-async"} <= allowed

    # The real request then lets the page read Retry-After and X-Request-ID.
    real = httpx.get(f"{server.url}/v1/assets", headers={"Origin": ALLOWED_ORIGIN})
    assert real.status_code == 401  # CORS does not replace auth
    assert real.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip().lower() for h in real.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"retry-after", "x-request-id"}


def test_cors_preflight_from_another_origin_gets_no_cors_headers(server):
    response = httpx.options(
        f"{server.url}/generate/flux-dev",
        headers={
            "Origin": "https://elsewhere.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    real = httpx.get(f"{server.url}/healthz", headers={"Origin": "https://elsewhere.example"})
    assert not [h for h in real.headers if h.lower().startswith("access-control-")]


def test_no_cors_origins_means_no_cors_at_all():
    app = FastAPI()

    @app.get("/ping")
    def ping():
        return {}

    install_cors(app, Settings(cors_origins=""))
    with TestClient(app) as client:
        response = client.get("/ping", headers={"Origin": ALLOWED_ORIGIN})
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    assert Settings(cors_origins=" https://a.example/, http://b.example:8080 ,").cors_origin_list == [
        "https://a.example",
        "http://b.example:8080",
    ]


def test_a_one_model_server_shows_no_model_picker(playground):
    page = playground.page
    playground.open()
    page.wait_for_selector('body[data-models="flux-dev"]', state="attached")
    assert page.locator("#model-group").count() == 1 and page.is_hidden("#model-group")
    modes = page.eval_on_selector_all(
        'input[name="mode"]', "radios => radios.filter(r => !r.closest('label').hidden).map(r => r.value)"
    )
    assert modes == ["text", "image", "inpaint"]
    assert page.input_value("#steps") == "30" and page.input_value("#guidance") == "3.5"
