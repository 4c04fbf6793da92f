"""LoRAs by name in generate requests: effect, weights, combination, cache, hot folder, concurrency."""

from __future__ import annotations

import os
import threading

import httpx
import numpy as np
import pytest
from conftest import b64_to_image, pixels
from helpers.requests import STEPS

from octoflux.pipelines.tiny_lora import (
    DOUBLE_BLOCK_TARGETS,
    make_lora,
    save_diffusers,
    save_raw,
    to_kohya,
    to_sd_scripts,
)


@pytest.fixture(scope="module")
def states():
    return {
        "style": make_lora(1),
        "detail": make_lora(2),
        "third": make_lora(3),
        "clip": make_lora(4, text_encoder=True),
        "double": make_lora(5, transformer_targets=DOUBLE_BLOCK_TARGETS),
    }


@pytest.fixture(scope="module")
def live(server_factory, states):
    with server_factory(lora_cache_size=2) as live:
        for name in ("style", "detail", "third", "clip"):
            save_diffusers(states[name], live.settings.lora_dir / f"{name}.safetensors")
        yield live


def post(live, loras=None, seed=1, prompt="a red fox") -> httpx.Response:
    body = {"prompt": prompt, "width": 512, "height": 512, "steps": STEPS, "seed": seed}
    if loras is not None:
        body["loras"] = loras
    return httpx.post(f"{live.url}/generate/flux-dev", json=body, timeout=120)


def image(live, loras=None, **kwargs) -> np.ndarray:
    response = post(live, loras, **kwargs)
    assert response.status_code == 200, response.text
    return pixels(b64_to_image(response.json()["images"][0]["image_b64"]))


def assert_422_naming(response: httpx.Response, name: str) -> str:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "loras"]
    assert name in error["msg"]
    return error["msg"]


def moved(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_lora_changes_the_image(live):
    base = image(live)
    styled = live.client().image_gen.generate_flux_dev(
        prompt="a red fox", width=512, height=512, steps=STEPS, seed=1, loras={"style": 1.0}
    )
    assert moved(pixels(b64_to_image(styled.images[0].image_b64)), base) > 0.5


def test_weight_zero_equals_base(live):
    base = image(live)
    assert np.array_equal(image(live, {"style": 0.0}), base)


def test_two_loras_combine(live):
    both = image(live, {"style": 0.7, "detail": 0.7})
    assert moved(both, image(live, {"style": 0.7})) > 0.3
    assert moved(both, image(live, {"detail": 0.7})) > 0.3


def test_owner_prefix_is_ignored(live):
    assert np.array_equal(image(live, {"octoai:style": 1.0}), image(live, {"style": 1.0}))


def test_text_encoder_lora_changes_the_image(live):
    assert moved(image(live, {"clip": 1.0}), image(live)) > 0.5


def test_kohya_and_sd_scripts_layouts_give_the_diffusers_image(live, states):
    folder = live.settings.lora_dir
    save_raw(to_kohya(states["clip"]), folder / "clip-kohya.safetensors")
    save_diffusers(states["double"], folder / "double.safetensors")
    save_raw(to_sd_scripts(states["double"]), folder / "double-sd-scripts.safetensors")
    assert np.array_equal(image(live, {"clip-kohya": 0.8}), image(live, {"clip": 0.8}))
    assert np.array_equal(image(live, {"double-sd-scripts": 1.0}), image(live, {"double": 1.0}))
    assert moved(image(live, {"double": 1.0}), image(live)) > 0.5


def test_kohya_file_with_clip_te1_keys_is_served_like_its_diffusers_twin(live):
    """sd-scripts writes CLIP as `lora_te1_*`; plain diffusers loads it onto CLIP, so must we."""
    folder = live.settings.lora_dir
    state = make_lora(6, transformer_targets=DOUBLE_BLOCK_TARGETS, text_encoder=True)
    save_diffusers(state, folder / "double-clip.safetensors")
    save_raw(to_sd_scripts(state), folder / "double-clip-kohya.safetensors")
    assert np.array_equal(image(live, {"double-clip-kohya": 0.9}), image(live, {"double-clip": 0.9}))
    assert moved(image(live, {"double-clip-kohya": 0.9}), image(live)) > 0.5


def test_unknown_or_badly_named_lora_is_a_422_naming_it(live):
    assert_422_naming(post(live, {"nope": 1.0}), "nope")
    assert_422_naming(post(live, {"../style": 1.0}), "../style")
    assert_422_naming(post(live, {"style": 1.0, "octoai:style": 0.5}), "named twice")


def test_unusable_file_in_folder_is_a_422_with_the_reason(live):
    (live.settings.lora_dir / "pickled.safetensors").write_bytes(b"\x80\x04" + b"\x00" * 64)
    assert "not a safetensors file" in assert_422_naming(post(live, {"pickled": 1.0}), "pickled")


def test_base_image_is_identical_before_and_after_loras_were_used_and_evicted(server_factory, states):
    with server_factory(lora_cache_size=2) as live:
        for name in ("style", "detail", "third", "clip"):
            save_diffusers(states[name], live.settings.lora_dir / f"{name}.safetensors")
        before = image(live)  # this server has never loaded a LoRA
        for loras in ({"style": 1.0}, {"detail": 1.0, "third": 0.5}, {"clip": 1.0}, {"style": -1.0}):
            assert moved(image(live, loras), before) > 0.3
        stats = live.service.engine.loras.stats
        assert stats.loads >= 5 and stats.evictions >= 3 and stats.switches >= 4
        assert len(live.service.engine.loras.resident) <= 2
        assert np.array_equal(image(live), before)
        assert np.array_equal(image(live, {"detail": 0.0}), before)


def test_folder_hot_add_replace_and_delete_on_a_running_server(live, states):
    path = live.settings.lora_dir / "hot.safetensors"
    assert_422_naming(post(live, {"hot": 1.0}), "hot")

    save_diffusers(states["style"], path)
    assert np.array_equal(image(live, {"hot": 1.0}), image(live, {"style": 1.0}))

    # Overwritten in place: same size, same inode; only the modification time says it changed.
    staged = save_diffusers(states["third"], live.settings.lora_dir / "staging" / "x.safetensors")
    assert staged.stat().st_size == path.stat().st_size
    path.write_bytes(staged.read_bytes())
    assert np.array_equal(image(live, {"hot": 1.0}), image(live, {"third": 1.0}))

    # Replaced by rename, as most tools do.
    save_diffusers(states["detail"], staged)
    os.replace(staged, path)
    assert np.array_equal(image(live, {"hot": 1.0}), image(live, {"detail": 1.0}))

    path.unlink()
    assert_422_naming(post(live, {"hot": 1.0}), "hot")


def test_concurrent_requests_with_different_lora_sets_match_sequential_ones(live):
    sets = [None, {"style": 1.0}, {"detail": 0.5}, {"style": 0.5, "detail": 1.0}, {"third": 1.0}, None]
    sequential = [image(live, loras, seed=3) for loras in sets]
    results: list[np.ndarray | None] = [None] * len(sets)

    def run(i):
        results[i] = image(live, sets[i], seed=3)

    threads = [threading.Thread(target=run, args=(i,)) for i in reversed(range(len(sets)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for i, loras in enumerate(sets):
        assert np.array_equal(results[i], sequential[i]), loras
    assert moved(sequential[1], sequential[0]) > 0.3


def test_lora_scale_is_what_the_weight_says(live, states):
    """A LoRA file with B scaled x2 at weight 0.5 equals the original at weight 1 (to rounding)."""
    doubled = {k: v * 2 if "lora_B" in k else v for k, v in states["style"].items()}
    save_diffusers(doubled, live.settings.lora_dir / "style-x2.safetensors")
    diff = np.abs(image(live, {"style-x2": 0.5}) - image(live, {"style": 1.0}))
    assert diff.max() <= 1


def test_lora_applies_on_a_transformer_with_fused_qkv(load_tiny, tiny_checkpoint, states, tmp_path):
    """--optimize compile fuses q/k/v; loading a LoRA must unfuse them or the LoRA is ignored."""

    from octoflux.pipelines.engine import Engine, GenerationSpec
    from octoflux.pipelines.loras import LoraCache, LoraLibrary

    pipe = load_tiny()
    save_diffusers(states["style"], tmp_path / "style.safetensors")
    engine = Engine(pipe, loras=LoraCache(pipe, LoraLibrary(tmp_path)), prompt_cache_size=0)
    spec = dict(prompt="a fox", width=512, height=512, steps=STEPS, guidance=3.5, seeds=[3])
    base = pixels(engine.generate(GenerationSpec(**spec)).images[0])
    pipe.transformer.fuse_qkv_projections()
    fused_base = pixels(engine.generate(GenerationSpec(**spec)).images[0])
    styled = pixels(engine.generate(GenerationSpec(**spec, loras={"style": 1.0})).images[0])
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())
    assert np.abs(fused_base - base).max() <= 1
    assert np.abs(styled - base).mean() > 1.0


def metric(live, name: str) -> float:
    text = httpx.get(f"{live.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_metrics_count_lora_cache_misses_then_hits(live, states):
    save_diffusers(states["style"], live.settings.lora_dir / "metered.safetensors")
    misses, hits = (
        metric(live, "octoflux_lora_cache_misses_total"),
        metric(live, "octoflux_lora_cache_hits_total"),
    )
    image(live, {"metered": 1.0})
    assert metric(live, "octoflux_lora_cache_misses_total") == misses + 1
    image(live, {"metered": 1.0})
    assert metric(live, "octoflux_lora_cache_hits_total") == hits + 1
    assert metric(live, "octoflux_lora_cache_misses_total") == misses + 1


def test_text_encoder_only_lora_with_prompt_cache_changes_and_restores_embeddings(live):
    """The prompt-embedding cache must key on the CLIP LoRA: base, LoRA, base, LoRA repeat exactly."""
    clip_only = {k: v for k, v in make_lora(21, text_encoder=True).items() if k.startswith("text_encoder.")}
    save_diffusers(clip_only, live.settings.lora_dir / "te.safetensors")
    prompt = "the same prompt every time"
    first_base, first_te = image(live, prompt=prompt), image(live, {"te": 1.0}, prompt=prompt)
    second_base, second_te = image(live, prompt=prompt), image(live, {"te": 1.0}, prompt=prompt)
    assert np.abs(first_te - first_base).mean() > 0.5
    assert np.array_equal(first_base, second_base)
    assert np.array_equal(first_te, second_te)
