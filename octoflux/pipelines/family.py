"""Which FLUX.1 a checkpoint is (dev or schnell) and what each serves by default."""

from __future__ import annotations

from dataclasses import dataclass

FLUX_DEV = "flux-dev"
FLUX_SCHNELL = "flux-schnell"


@dataclass(frozen=True)
class Family:
    """What the API offers for one model family; the service reads its defaults from here."""

    model_id: str  # the id routes and /v1/models use
    title: str  # how messages name it
    default_steps: int
    guidance: bool  # False: the transformer has no guidance embedding, cfg_scale changes nothing
    image_inputs: bool  # img2img and inpaint offered
    # T5 tokens of the prompt; schnell was distilled with 256 (diffusers' reference use).
    max_sequence_length: int

    @property
    def modes(self) -> tuple[str, ...]:
        return ("text2img", "img2img", "inpaint") if self.image_inputs else ("text2img",)


FAMILIES: dict[str, Family] = {
    FLUX_DEV: Family(
        FLUX_DEV, "FLUX.1-dev", default_steps=30, guidance=True, image_inputs=True, max_sequence_length=512
    ),
    FLUX_SCHNELL: Family(
        FLUX_SCHNELL,
        "FLUX.1-schnell",
        default_steps=4,
        guidance=False,
        image_inputs=False,
        max_sequence_length=256,
    ),
}


def family_from_transformer_config(config) -> str:
    """schnell is timestep-distilled without a guidance embedding; dev (and its finetunes) have one."""
    guidance_embeds = config.get("guidance_embeds") if isinstance(config, dict) else config.guidance_embeds
    return FLUX_DEV if guidance_embeds else FLUX_SCHNELL


def detect_family(pipe) -> str:
    """The family of a loaded FluxPipeline, from its transformer's config."""
    return family_from_transformer_config(pipe.transformer.config)
