"""What the state store keeps of an accepted async request gives back the same request."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from octoflux.core.stored_request import SPEC_FIELDS, StoredRequest, UnreadableRequest
from octoflux.pipelines.engine import GenerationSpec


def test_a_stored_request_comes_back_pixel_for_pixel_with_its_seeds_and_dialect():
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 256, (64, 96), dtype=np.uint8))
    spec = GenerationSpec(
        prompt="a lighthouse, ünïcode",
        width=96,
        height=64,
        steps=3,
        guidance=3.5,
        seeds=[7, 4294967295],
        init_image=init,
        mask_image=mask,
        strength=0.6,
        loras={"style": 0.8, "png": 0.5},  # a LoRA may have any name
        model="flux-dev",
    )
    back = StoredRequest.from_bytes(StoredRequest(spec, "octoai", {"encoding": "jpeg"}).to_bytes())
    assert (back.dialect, back.options) == ("octoai", {"encoding": "jpeg"})
    for name in SPEC_FIELDS - {"init_image", "mask_image"}:  # every field the spec has, now or later
        assert getattr(back.spec, name) == getattr(spec, name), name
    assert back.spec.init_image.mode == "RGB" and back.spec.mask_image.mode == "L"
    assert np.array_equal(np.asarray(back.spec.init_image), np.asarray(init))
    assert np.array_equal(np.asarray(back.spec.mask_image), np.asarray(mask))


def test_text_to_image_needs_no_images():
    spec = GenerationSpec(prompt="p", width=512, height=512, steps=2, guidance=3.5, seeds=[1])
    back = StoredRequest.from_bytes(StoredRequest(spec, "octoai").to_bytes())
    assert back.spec == spec and back.options == {}


UNREADABLE = [
    b"",
    b"not json",
    b'{"version": 99}',
    b'{"version": 1, "spec": {}, "images": {}, "dialect": "octoai", "options": {}}',
    b'{"version": 1, "spec": {"prompt": "p", "future": 1}, "images": {}, "dialect": "o", "options": {}}',
    b'{"version": 1, "spec": {}, "images": {"init_image": "bm90IGEgcG5n"}, "dialect": "o", "options": {}}',
]


@pytest.mark.parametrize("data", UNREADABLE)
def test_unreadable_bytes_raise_one_error_type(data):
    with pytest.raises(UnreadableRequest):
        StoredRequest.from_bytes(data)
