"""Which FLUX.1 a checkpoint is (dev, schnell, Kontext or Fill) and what each serves by default."""

from __future__ import annotations

from dataclasses import dataclass

FLUX_DEV = "flux-dev"
FLUX_SCHNELL = "flux-schnell"
FLUX_KONTEXT_DEV = "flux-kontext-dev"
FLUX_FILL_DEV = "flux-fill-dev"

# Modes a GenerationSpec names; "edit" is Kontext's (an image edited by instruction).
TEXT2IMG, IMG2IMG, INPAINT, EDIT = "text2img", "img2img", "inpaint", "edit"


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
    modes: tuple[str, ...] = (TEXT2IMG, IMG2IMG, INPAINT)
    default_guidance: float = 3.5
    # The diffusers pipeline class its checkpoints name in model_index.json.
    pipeline_class: str = "FluxPipeline"

    @property
    def needs_image(self) -> bool:
        """Every request carries an init image (Kontext edits one, Fill repaints one)."""
        return TEXT2IMG not in self.modes


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
        modes=(TEXT2IMG,),
    ),
    # diffusers' defaults for each: Kontext 28 steps at guidance 2.5, Fill 50 steps at guidance 30.
    FLUX_KONTEXT_DEV: Family(
        FLUX_KONTEXT_DEV,
        "FLUX.1-Kontext-dev",
        default_steps=28,
        guidance=True,
        image_inputs=True,
        max_sequence_length=512,
        modes=(EDIT,),
        default_guidance=2.5,
        pipeline_class="FluxKontextPipeline",
    ),
    FLUX_FILL_DEV: Family(
        FLUX_FILL_DEV,
        "FLUX.1-Fill-dev",
        default_steps=50,
        guidance=True,
        image_inputs=True,
        max_sequence_length=512,
        modes=(INPAINT,),
        default_guidance=30.0,
        pipeline_class="FluxFillPipeline",
    ),
}


def family_from_transformer_config(config, pipeline_class: str | None = None) -> str:
    """Fill reads 384 input channels; Kontext has dev's transformer and says so in model_index.json;
    schnell is timestep-distilled without a guidance embedding; dev (and its finetunes) have one."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    in_channels = get("in_channels") or 64
    out_channels = get("out_channels") or in_channels
    if in_channels != out_channels and in_channels == out_channels * 6:
        return FLUX_FILL_DEV
    if pipeline_class == FAMILIES[FLUX_KONTEXT_DEV].pipeline_class:
        return FLUX_KONTEXT_DEV
    return FLUX_DEV if get("guidance_embeds") else FLUX_SCHNELL


def family_of_pipeline_class(name: str | None) -> str | None:
    """The family a model_index.json `_class_name` names, where it names exactly one."""
    for family in (FLUX_KONTEXT_DEV, FLUX_FILL_DEV):
        if FAMILIES[family].pipeline_class == name:
            return family
    return None


def detect_family(pipe) -> str:
    """The family of a loaded pipeline, from its transformer's config and its class."""
    return family_from_transformer_config(pipe.transformer.config, type(pipe).__name__)
