"""The safety checker: diffusers' scoring, the folder layouts it ships in, and both outcomes in the engine."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import gradient_image, pixels
from PIL import Image

from octoflux import cli
from octoflux.pipelines.engine import Engine, GenerationSpec
from octoflux.pipelines.safety import (
    SafetyChecker,
    SafetyCheckerLoadError,
    build_tiny_safety_checker,
    checker_folders,
    concept_scores,
)

CPU = torch.device("cpu")
SIZE = 256
NEVER_FLAGS, ALWAYS_FLAGS = 1.0, -1.0  # cosine similarity lies in [-1, 1]


def noise_images(count: int, size: int = 64) -> list[Image.Image]:
    return [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))
        for i in range(count)
    ] + [gradient_image(size, size)]


@pytest.fixture(scope="module")
def checker_dirs(tmp_path_factory) -> dict[str, str]:
    """Two tiny checkers written by the CLI: one that flags nothing, one that flags everything."""
    dirs = {}
    for name, threshold in (("pass", NEVER_FLAGS), ("flag", ALWAYS_FLAGS)):
        target = tmp_path_factory.mktemp(f"checker-{name}")
        cli.main(
            ["make-tiny", "--variant", "safety-checker", "--concept-threshold", str(threshold), str(target)]
        )
        dirs[name] = str(target)
    return dirs


@pytest.fixture(scope="module")
def tiny_pipe(load_tiny, tiny_checkpoint):
    return load_tiny()


# --- scoring -----------------------------------------------------------------------------------


def test_special_care_concept_lowers_every_bar_by_0_01_as_diffusers_does():
    special_cos = np.array([[0.30, 0.195], [0.10, 0.10]])
    concept_cos = np.array([[0.195, 0.0], [0.195, 0.0]])
    scores = concept_scores(special_cos, concept_cos, np.array([0.2, 0.2]), np.array([0.2, 0.5]))
    # Image 0: the first special concept fires, so +0.01 everywhere (and on the second special one).
    assert scores[0].tolist() == [0.005, -0.49]
    # Image 1: nothing special fires; 0.195 - 0.2 stays below zero.
    assert scores[1].tolist() == [-0.005, -0.5]


def test_verdicts_match_diffusers_checker_on_a_mixed_batch():
    model, processor = build_tiny_safety_checker(concept_threshold=0.0)
    with torch.no_grad():
        model.special_care_embeds_weights.fill_(NEVER_FLAGS)
    checker = SafetyChecker(model.eval(), processor, CPU, torch.float32)
    images = noise_images(5)
    raw = [v.score for v in checker.check(images)]  # threshold 0: score = highest cosine similarity
    threshold = float(np.median(raw))
    with torch.no_grad():
        model.concept_embeds_weights.fill_(threshold)
    verdicts = checker.check(images)

    clip_input = processor(images, return_tensors="pt").pixel_values
    _, diffusers_flags = model(clip_input, [np.zeros((1, 1, 3))] * len(images))
    assert [v.flagged for v in verdicts] == diffusers_flags
    assert 0 < sum(diffusers_flags) < len(images)  # both outcomes in one batch
    for before, verdict in zip(raw, verdicts, strict=True):
        assert verdict.score == pytest.approx(before - threshold, abs=2e-3)
        assert verdict.flagged == (verdict.score > 0)


def test_check_runs_one_forward_pass_for_the_whole_batch(checker_dirs):
    checker = SafetyChecker.load(checker_dirs["pass"], CPU, torch.float32)
    calls = []
    hook = checker.model.vision_model.register_forward_hook(lambda module, args, out: calls.append(args))
    try:
        verdicts = checker.check(noise_images(3, size=512))
    finally:
        hook.remove()
    assert len(verdicts) == 4 and len(calls) == 1
    assert not any(v.flagged for v in verdicts) and all(v.score <= 0 for v in verdicts)
    assert checker.check([]) == []


# --- folder layouts ----------------------------------------------------------------------------


def test_loads_the_checker_repo_layout_and_the_stable_diffusion_pipeline_layout(checker_dirs, tmp_path):
    repo = checker_dirs["flag"]
    sd = tmp_path / "sd-pipeline"
    shutil.copytree(repo, sd / "safety_checker", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    (sd / "feature_extractor").mkdir()
    shutil.copy(f"{repo}/preprocessor_config.json", sd / "feature_extractor")

    assert checker_folders(sd) == (sd / "safety_checker", sd / "feature_extractor")
    assert checker_folders(sd / "safety_checker") == (sd / "safety_checker", sd / "feature_extractor")
    images = noise_images(1)
    expected = SafetyChecker.load(repo, CPU, torch.float32).check(images)
    for folder in (sd, sd / "safety_checker"):
        assert SafetyChecker.load(folder, CPU, torch.float32).check(images) == expected
    assert all(v.flagged for v in expected)


def test_missing_checker_is_a_load_error(tmp_path):
    with pytest.raises(SafetyCheckerLoadError, match="no safety checker"):
        SafetyChecker.load(tmp_path, CPU, torch.float32)


# --- in the engine, all three modes ------------------------------------------------------------

MODES = {
    "text2img": {},
    "img2img": {"init_image": gradient_image(SIZE, SIZE)},
    "inpaint": {"init_image": gradient_image(SIZE, SIZE), "mask_image": Image.new("L", (SIZE, SIZE), 255)},
}


def spec(mode: str) -> GenerationSpec:
    return GenerationSpec(
        prompt="a red fox", width=SIZE, height=SIZE, steps=2, guidance=3.5, seeds=[1, 2], **MODES[mode]
    )


@pytest.fixture(scope="module")
def engines(tiny_pipe, checker_dirs) -> dict[str, Engine]:
    def checker(name):
        return SafetyChecker.load(checker_dirs[name], CPU, torch.float32)

    return {
        "none": Engine(tiny_pipe),
        "pass": Engine(tiny_pipe, safety_checker=checker("pass")),
        "flag": Engine(tiny_pipe, safety_checker=checker("flag")),
    }


@pytest.mark.parametrize("mode", MODES)
def test_without_a_checker_images_are_unscreened(engines, mode):
    result = engines["none"].generate(spec(mode))
    assert result.safety is None
    assert result.removed_for_safety == [False, False]
    assert result.safety_scores == [None, None]


@pytest.mark.parametrize("mode", MODES)
def test_checker_that_passes_leaves_pixels_unchanged_and_scores_each_image(engines, mode):
    plain = engines["none"].generate(spec(mode))
    checked = engines["pass"].generate(spec(mode))
    assert checked.removed_for_safety == [False, False]
    assert all(isinstance(s, float) and s <= 0 for s in checked.safety_scores)
    for a, b in zip(plain.images, checked.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


@pytest.mark.parametrize("mode", MODES)
def test_flagged_images_come_back_black_of_the_same_size(engines, mode):
    result = engines["flag"].generate(spec(mode))
    assert result.removed_for_safety == [True, True]
    assert all(s > 0 for s in result.safety_scores)
    for image in result.images:
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        assert pixels(image).max() == 0


def test_build_engine_loads_the_checker_from_settings(tiny_checkpoint, checker_dirs, tmp_path):
    from octoflux.app import build_engine
    from octoflux.settings import Settings

    settings = Settings(
        model=tiny_checkpoint, device="cpu", safety_checker=checker_dirs["flag"], lora_dir=tmp_path
    )
    engine = build_engine(settings)
    assert isinstance(engine.safety_checker, SafetyChecker)
    assert engine.generate(spec("text2img")).removed_for_safety == [True, True]
    assert (
        build_engine(Settings(model=tiny_checkpoint, device="cpu", lora_dir=tmp_path)).safety_checker is None
    )


def test_safety_benchmark_smoke(capsys):
    from benchmarks.safety import main

    result = main(["--sizes", "64x64", "--batches", "2", "--runs", "1"])
    (row,) = result["rows"]
    assert (row["size"], row["batch"]) == ("64x64", 2) and row["ms_per_image"] > 0
    assert "safety checker (tiny, cpu): 64x64 batch 2:" in capsys.readouterr().out
