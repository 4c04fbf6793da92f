"""The playground on a server of the whole FLUX.1 family (`--model tiny-family`), in headless Chromium:
the model picker, Kontext's "edit by instruction" and Fill's outpainting.

The browser, the page helper and the skip rules are test_playground.py's.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from conftest import gradient_image, pixels
from test_playground import STATIC, STEPS, Playground, browser, image_of  # noqa: F401 (browser: a fixture)

from octoflux.app import build_models
from octoflux.core.models import KONTEXT_RESOLUTIONS, SUPPORTED_RESOLUTIONS
from octoflux.core.spec import resolve_size
from octoflux.pipelines.family import (
    EDIT,
    FAMILIES,
    FLUX_FILL_DEV,
    FLUX_KONTEXT_DEV,
    IMG2IMG,
    INPAINT,
    TEXT2IMG,
)

PAGE_MODES = {TEXT2IMG: "text", IMG2IMG: "image", INPAINT: "inpaint", EDIT: "edit"}


def page_models() -> dict:
    """app.js's MODELS table (written as JSON there)."""
    source = (STATIC / "app.js").read_text()
    return json.loads(re.search(r"export const MODELS = (\{.*?\n\});", source, re.DOTALL).group(1))


@pytest.fixture(scope="module")
def family_server(server_factory, tmp_path_factory):
    tiny_dir = tmp_path_factory.mktemp("playground-family") / "tiny-flux"
    with server_factory(
        engine_factory=build_models, model="tiny-family", tiny_dir=tiny_dir, warmup=False
    ) as live:
        yield live


@pytest.fixture
def playground(browser, family_server, request):  # noqa: F811 (browser: the fixture)
    """A fresh page on the family server (no API keys), once it has listed the served models."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    current = Playground(context.new_page(), family_server.url)
    try:
        current.page.on(
            "request",
            lambda r: (
                current.generate_requests.append(r) if r.method == "POST" and "/generate/" in r.url else None
            ),
        )
        current.page.goto(family_server.url + "/")
        current.page.wait_for_selector("body[data-models]", state="attached")
        yield current
        current.screenshot(request.node.name)
    finally:
        context.close()
    assert current.problems == []


def visible_modes(page) -> list[str]:
    return page.eval_on_selector_all(
        'input[name="mode"]', "radios => radios.filter(r => !r.closest('label').hidden).map(r => r.value)"
    )


def upload(page, picture, tmp_path) -> None:
    path = tmp_path / "picture.png"
    picture.save(path)
    page.set_input_files("#init-file", str(path))
    page.wait_for_selector("#init-view:not([hidden])")


# ------------------------------------------------------------------ no browser


def test_page_models_have_the_servers_defaults_and_modes():
    models = page_models()
    assert list(models) == list(FAMILIES)
    for model_id, family in FAMILIES.items():
        shown = models[model_id]
        assert shown["title"] == family.title
        assert shown["steps"] == family.default_steps
        assert shown["guidance"] == (family.default_guidance if family.guidance else None)
        outpaint = ["outpaint"] if model_id == FLUX_FILL_DEV else []
        assert shown["modes"] == [PAGE_MODES[mode] for mode in family.modes] + outpaint


def test_page_kontext_sizes_are_the_servers():
    listed = re.search(
        r"export const KONTEXT_SIZES = \[(.*?)\n\];", (STATIC / "app.js").read_text(), re.DOTALL
    )
    pairs = [(int(w), int(h)) for w, h in re.findall(r"\[(\d+), (\d+)\]", listed.group(1))]
    assert pairs == list(KONTEXT_RESOLUTIONS)


# ------------------------------------------------------------------ browser flows


def test_picker_lists_the_served_models_and_offers_each_ones_modes_and_defaults(playground):
    page = playground.page
    assert page.is_visible("#model")
    options = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert options == list(FAMILIES)
    expected = {
        "flux-dev": (["text", "image", "inpaint"], "30", "3.5"),
        "flux-schnell": (["text"], "4", ""),
        "flux-kontext-dev": (["edit"], "28", "2.5"),
        "flux-fill-dev": (["inpaint", "outpaint"], "50", "30"),
    }
    for model_id, (modes, steps, guidance) in expected.items():
        page.select_option("#model", model_id)
        assert visible_modes(page) == modes, model_id
        assert page.input_value("#steps") == steps
        assert page.input_value("#guidance") == guidance
        assert page.is_disabled("#guidance") == (guidance == "")
        assert f"{steps} steps" in page.inner_text("#defaults-hint")
        # schnell is text to image only: no image section at all.
        assert page.is_visible("#init") == (model_id != "flux-schnell")


def test_kontext_edits_an_uploaded_picture_by_instruction(playground, tmp_path):
    page = playground.page
    picture = gradient_image(300, 200)
    page.select_option("#model", FLUX_KONTEXT_DEV)
    assert page.is_checked('input[name="mode"][value="edit"]')
    assert page.inner_text("#prompt-label") == "Instruction"
    upload(page, picture, tmp_path)
    assert page.is_hidden("#mask-tools") and page.is_hidden("#strength-tools")
    # Without a size the server picks Kontext's size nearest the picture's aspect; the page says which.
    auto = resolve_size(None, None, 300 / 200, FAMILIES[FLUX_KONTEXT_DEV])
    assert page.input_value("#size") == "auto"
    assert page.locator("#size option[value=auto]").inner_text() == f"auto: {auto[0]} × {auto[1]}"
    page.fill("#prompt", "make the gradient red")
    page.fill("#steps", str(STEPS))
    # "auto" sends no size. Rendering at it takes long on the CPU: that request is answered "busy".
    page.route(
        f"**/generate/{FLUX_KONTEXT_DEV}",
        lambda route: route.fulfill(status=429, headers={"Retry-After": "1"}),
    )
    page.click("#generate")
    page.locator("#banner").wait_for()
    assert not {"width", "height"} & set(playground.generate_requests[-1].post_data_json)
    page.unroute(f"**/generate/{FLUX_KONTEXT_DEV}")
    page.select_option("#size", "512x512")
    figure = playground.generate()

    assert figure.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [512, 512]
    sent = playground.generate_requests[-1]
    assert sent.url.endswith(f"/generate/{FLUX_KONTEXT_DEV}")
    body = sent.post_data_json
    assert body["init_image"] == base64.b64encode((tmp_path / "picture.png").read_bytes()).decode()
    assert (body["prompt"], body["cfg_scale"], body["width"], body["height"]) == (
        "make the gradient red",
        2.5,
        512,
        512,
    )
    assert not {"strength", "mask_image", "outpaint"} & set(body)
    assert "FLUX.1-Kontext-dev · edit by instruction" in page.inner_text(
        '#gallery .run[data-run="1"] .run-info'
    )


def test_fill_outpaint_shows_and_renders_the_enlarged_size(playground, tmp_path):
    page = playground.page
    picture = gradient_image(384, 512)
    page.select_option("#model", FLUX_FILL_DEV)
    page.check('input[name="mode"][value="outpaint"]')
    upload(page, picture, tmp_path)
    assert page.is_disabled("#size") and page.is_hidden("#mask-tools") and page.is_hidden("#strength-tools")
    page.fill("#outpaint-right", "100")
    assert "not a supported size" in page.inner_text("#outpaint-size")
    page.fill("#outpaint-left", "64")
    page.fill("#outpaint-right", "64")
    assert page.inner_text("#outpaint-size") == "Result: 512 × 512"
    assert (512, 512) in SUPPORTED_RESOLUTIONS
    page.fill("#prompt", "more of the same")
    page.fill("#steps", str(STEPS))
    figure = playground.generate()

    assert figure.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [512, 512]
    sent = playground.generate_requests[-1]
    assert sent.url.endswith(f"/generate/{FLUX_FILL_DEV}")
    body = sent.post_data_json
    assert body["outpaint"] == {"left": 64, "right": 64, "top": 0, "bottom": 0}
    assert "mask_image" not in body and "strength" not in body
    result = pixels(image_of(figure))
    assert np.array_equal(result[:, 64:448], pixels(picture))  # the picture is kept as it was
