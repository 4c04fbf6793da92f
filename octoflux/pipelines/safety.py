"""An image safety checker in diffusers' `StableDiffusionSafetyChecker` format, run after decoding.

Scores follow diffusers' own `StableDiffusionSafetyChecker.forward`: for each of its 17 concepts,
cosine similarity of the CLIP image embedding to the concept embedding minus that concept's
threshold (`concept_embeds_weights`), plus 0.01 once any of the 3 "special care" concepts fires,
rounded to 3 decimals. An image is flagged when any concept score is above 0; its verdict's
score is the highest concept score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# diffusers' own value: how much a firing special-care concept lowers every concept's bar.
SPECIAL_CARE_ADJUSTMENT = 0.01


class SafetyCheckerLoadError(RuntimeError):
    """The safety checker folder is missing or not in the expected format."""


@dataclass(frozen=True)
class SafetyVerdict:
    score: float  # the highest concept score; above 0 means flagged
    flagged: bool


def checker_folders(directory: Path) -> tuple[Path, Path | None]:
    """(model folder, feature extractor folder or None) for the layouts the checker ships in.

    - the checker's own repo (CompVis/stable-diffusion-safety-checker): config.json, weights and
      preprocessor_config.json side by side;
    - a Stable Diffusion pipeline folder: safety_checker/ beside feature_extractor/;
    - that pipeline's safety_checker/ folder itself: the feature extractor is its sibling.
    """
    directory = Path(directory)
    if (directory / "safety_checker" / "config.json").is_file():
        model_dir, candidates = directory / "safety_checker", [directory / "feature_extractor"]
    elif (directory / "config.json").is_file():
        model_dir, candidates = directory, [directory, directory.parent / "feature_extractor"]
    else:
        raise SafetyCheckerLoadError(
            f"no safety checker in {directory}: expected config.json (or safety_checker/config.json)"
        )
    extractor = next((c for c in candidates if (c / PREPROCESSOR_CONFIG).is_file()), None)
    return model_dir, extractor


def concept_scores(
    special_cos: np.ndarray, concept_cos: np.ndarray, special_thresholds: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Per-image concept scores [batch, concepts], exactly as diffusers' checker computes them."""
    scores = np.empty(concept_cos.shape, dtype=np.float64)
    for i in range(concept_cos.shape[0]):
        adjustment = 0.0
        for j in range(special_cos.shape[1]):
            # diffusers applies the adjustment to the later special concepts too, once one fires.
            if round(float(special_cos[i, j] - special_thresholds[j] + adjustment), 3) > 0:
                adjustment = SPECIAL_CARE_ADJUSTMENT
        scores[i] = np.round(concept_cos[i] - thresholds + adjustment, 3)
    return scores


class SafetyChecker:
    """A loaded checker and its CLIP preprocessing; `check` is called from the worker thread."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, directory: str | Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        model_dir, extractor_dir = checker_folders(Path(directory))
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(model_dir, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise SafetyCheckerLoadError(
                f"could not load the safety checker from {model_dir}: {exc}"
            ) from exc
        if extractor_dir is not None:
            processor = CLIPImageProcessor.from_pretrained(extractor_dir)
        else:
            # CLIP's own preprocessing at the vision tower's input size, which is what the checker expects.
            side = model.config.vision_config.image_size
            log.warning(
                "no %s beside the safety checker; using CLIP's defaults at %dpx", PREPROCESSOR_CONFIG, side
            )
            processor = CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            )
        log.info("loaded the safety checker from %s on %s as %s", model_dir, device, dtype)
        return cls(model.to(device).eval(), processor, device, dtype)

    @torch.inference_mode()
    def check(self, images: list[Image.Image]) -> list[SafetyVerdict]:
        """One verdict per image, from one forward pass over the whole list."""
        if not images:
            return []
        pixels = self.processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        pooled = self.model.vision_model(pixels.to(self.device, self.dtype))[1]
        embeds = self.model.visual_projection(pooled)
        scores = concept_scores(
            _cosine(embeds, self.model.special_care_embeds),
            _cosine(embeds, self.model.concept_embeds),
            self.model.special_care_embeds_weights.float().cpu().numpy(),
            self.model.concept_embeds_weights.float().cpu().numpy(),
        )
        return [
            SafetyVerdict(score=round(float(row.max()), 3), flagged=bool((row > 0).any())) for row in scores
        ]


def _cosine(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> np.ndarray:
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    # float32 on the host, as diffusers does, so bf16 weights score the same way.
    return cosine_distance(image_embeds, concept_embeds).cpu().float().numpy()


def build_tiny_safety_checker(concept_threshold: float = 1.0, seed: int = 0):
    """A random-weight checker with a tiny CLIP vision tower (32px input) and its preprocessor.

    `concept_threshold` is every concept's (and special concept's) threshold: cosine similarity
    never exceeds 1, so 1.0 flags nothing, and -1.0 flags everything.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    side = 32
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=side,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(concept_threshold)
        model.special_care_embeds_weights.fill_(concept_threshold)
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return model, processor


def write_tiny_safety_checker(directory: str | Path, concept_threshold: float = 1.0) -> Path:
    """Write the tiny checker in the CompVis repo's layout: config, weights, preprocessor config."""
    directory = Path(directory)
    model, processor = build_tiny_safety_checker(concept_threshold)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory
