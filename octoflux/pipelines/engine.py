"""The resident FLUX pipeline and the three modes it serves from one copy of the weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from octoflux.pipelines.errors import GenerationFailed as GenerationFailed  # re-exported
from octoflux.pipelines.errors import OutOfMemory
from octoflux.pipelines.family import (
    EDIT,
    FAMILIES,
    FLUX_FILL_DEV,
    FLUX_KONTEXT_DEV,
    IMG2IMG,
    INPAINT,
    TEXT2IMG,
    detect_family,
)
from octoflux.pipelines.inpaint import composite_unmasked
from octoflux.pipelines.loras import LoraCache, LoraError
from octoflux.pipelines.prompt_cache import PromptEmbeddingCache, repeat_for_batch
from octoflux.pipelines.safety import SafetyChecker, SafetyVerdict

log = logging.getLogger(__name__)


class GenerationCancelled(Exception):
    """The job was cancelled (client gone, deadline, shutdown) between denoising steps."""


class ModeNotOffered(ValueError):
    """The model does not offer this mode (schnell: text-to-image only; Kontext: edit; Fill: inpaint)."""


@dataclass(frozen=True)
class GenerationSpec:
    """Everything the pipeline needs for one request, already validated and decoded."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seeds: list[int]
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    strength: float = 0.8
    loras: dict[str, float] = field(default_factory=dict)
    # The served model to run it on (a model id); None: the first one served.
    model: str | None = None

    @property
    def mode(self) -> str:
        """What the images given ask for; a Kontext model reads an image without a mask as an edit."""
        if self.init_image is None:
            return TEXT2IMG
        if self.mask_image is not None:
            return INPAINT
        return EDIT if self.model == FLUX_KONTEXT_DEV else IMG2IMG


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seconds: float
    # One verdict per image when a safety checker is loaded; flagged images are already black.
    safety: list[SafetyVerdict] | None = None

    @property
    def removed_for_safety(self) -> list[bool]:
        return [v.flagged for v in self.safety] if self.safety else [False] * len(self.images)

    @property
    def safety_scores(self) -> list[float | None]:
        return [v.score for v in self.safety] if self.safety else [None] * len(self.images)


@dataclass(frozen=True)
class StepEvent:
    """One finished denoising step of one batch, for progress reports and previews."""

    step: int  # 1-based
    steps: int  # steps this batch runs (img2img runs strength x steps)
    image_batch: int  # 0-based index of the batch within the request
    batches: int
    latents: torch.Tensor  # packed latents after this step, still on the device
    width: int
    height: int


StopCheck = Callable[[], bool]
StepListener = Callable[[StepEvent], None]


def _never_stop() -> bool:
    return False


class Engine:
    """Owns the resident pipeline; `generate` is called from one worker thread only."""

    def __init__(
        self,
        pipe,
        *,
        max_batch: int = 4,
        loras: LoraCache | None = None,
        prompt_cache_size: int = 32,
        optimizations=None,
        family: str | None = None,
        safety_checker: SafetyChecker | None = None,
        prompt_cache: PromptEmbeddingCache | None = None,
    ):
        self.pipe = pipe
        # flux-dev, flux-schnell, flux-kontext-dev or flux-fill-dev; what it offers is FAMILIES[family].
        self.family = family or detect_family(pipe)
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {sorted(FAMILIES)}")
        self.family_info = FAMILIES[self.family]
        # dev's image modes are views over the same modules: no weight is copied. Not `from_pipe`: it casts
        # every shared module to its `dtype` argument (float32 unless told) and refuses GGUF transformers.
        self.img2img = self.inpaint = None
        if IMG2IMG in self.family_info.modes:
            from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

            self.img2img = FluxImg2ImgPipeline(**pipe.components)
            self.inpaint = FluxInpaintPipeline(**pipe.components)
            for view in (self.img2img, self.inpaint):
                view.set_progress_bar_config(disable=True)
        self.max_batch = max(1, max_batch)
        if self.family == FLUX_FILL_DEV:
            # FluxFillPipeline samples the masked picture's latents with the first generator of a batch
            # only: batched, image k would differ from its seed alone. One image per call keeps seeds exact.
            self.max_batch = 1
        self.device = pipe.transformer.device
        # Adapters on `pipe` (and so on its views); None serves no LoRAs.
        self.loras = loras
        # T5 + CLIP outputs of recent prompts, shared by models whose encoders are the same objects;
        # None disables it (the pipeline encodes every time).
        if prompt_cache is None and prompt_cache_size > 0:
            prompt_cache = PromptEmbeddingCache(prompt_cache_size)
        self.prompt_cache = prompt_cache
        # What octoflux.pipelines.optimize applied (step cache, compile...); None when nothing was.
        self.optimizations = optimizations
        # Screens every decoded image once per request; None serves images unchecked.
        self.safety_checker = safety_checker

    def generate(
        self,
        spec: GenerationSpec,
        should_stop: StopCheck = _never_stop,
        on_step: StepListener | None = None,
        decode: bool = True,
    ) -> GenerationResult:
        """Run one request, in batches of at most `max_batch` images.

        `decode=False` runs the denoising loop only and returns no image: what context-parallel ranks
        1..N-1 do, while rank 0 decodes, screens and answers.
        """
        started = time.perf_counter()
        mode = self.mode_of(spec)
        if mode not in self.family_info.modes:
            raise ModeNotOffered(f"{self.family} offers {', '.join(self.family_info.modes)}, not {mode}")
        if self.loras is not None:
            # Every job sets its own LoRA set (none active when it names none) before it runs.
            try:
                self.loras.activate(spec.loras)
            except LoraError as exc:  # a LoRA made for another model of the family: say which model
                raise type(exc)(exc.name, f"{exc} (on {self.family})") from exc
        images: list[Image.Image] = []
        try:
            batches = range(0, len(spec.seeds), self.max_batch)
            for index, first in enumerate(batches):
                batch_seeds = spec.seeds[first : first + self.max_batch]
                progress = _step_reporter(on_step, spec, index, len(batches))
                images.extend(self._run_batch(spec, batch_seeds, should_stop, progress, decode))
            if not decode:
                return GenerationResult(images=[], seconds=time.perf_counter() - started)
            if mode == INPAINT:
                images = [composite_unmasked(img, spec.init_image, spec.mask_image) for img in images]
            safety = self._screen(images)
        except torch.OutOfMemoryError as exc:
            self.free_memory()
            raise OutOfMemory(str(exc).splitlines()[0]) from exc
        return GenerationResult(images=images, seconds=time.perf_counter() - started, safety=safety)

    def mode_of(self, spec: GenerationSpec) -> str:
        """The spec's mode on this model: Kontext edits the image it is given."""
        if spec.mode == IMG2IMG and EDIT in self.family_info.modes:
            return EDIT
        return spec.mode

    def _screen(self, images: list[Image.Image]) -> list[SafetyVerdict] | None:
        """Check the final images in one batch; flagged ones are replaced by black, as OctoAI did."""
        if self.safety_checker is None:
            return None
        verdicts = self.safety_checker.check(images)
        for i, verdict in enumerate(verdicts):
            if verdict.flagged:
                images[i] = Image.new(images[i].mode, images[i].size)
        return verdicts

    def _run_batch(
        self, spec: GenerationSpec, seeds: list[int], should_stop: StopCheck, progress, decode: bool = True
    ) -> list[Image.Image]:
        def stop_between_steps(pipe, step, timestep, tensors):
            if progress is not None:
                progress(step + 1, pipe.num_timesteps, tensors["latents"])
            if should_stop():
                raise GenerationCancelled()
            return tensors

        kwargs = dict(
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.steps,
            # Without a guidance embedding (schnell) diffusers ignores it; a fixed value makes that explicit.
            guidance_scale=spec.guidance if self.family_info.guidance else 0.0,
            max_sequence_length=self.family_info.max_sequence_length,
            num_images_per_prompt=len(seeds),
            # One CPU generator per image: a seed gives the same noise on any device, and
            # image k of a batch equals its seed run alone.
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="pt" if decode else "latent",
            callback_on_step_end=stop_between_steps,
        )
        mode = self.mode_of(spec)
        pipe = self.pipe
        if mode == EDIT:
            # Kontext rescales its output to `max_area` at the asked aspect: the asked size's area keeps it.
            kwargs.update(image=spec.init_image, max_area=spec.width * spec.height)
        elif mode != TEXT2IMG:
            if self.img2img is not None:  # dev; Fill inpaints with its own pipeline
                pipe = self.img2img if mode == IMG2IMG else self.inpaint
            kwargs.update(image=spec.init_image, strength=spec.strength)
            if mode == INPAINT:
                kwargs["mask_image"] = spec.mask_image
        with torch.inference_mode():
            # Encode after anything that changes the text encoders (LoRA activation) has run.
            kwargs.update(self._prompt_kwargs(pipe, spec, len(seeds)))
            if self.optimizations is not None:
                self.optimizations.before_generation(pipe)
            pixels = pipe(**kwargs).images
            return to_pil(pixels) if decode else []

    def _prompt_kwargs(self, pipe, spec: GenerationSpec, images: int) -> dict:
        if self.prompt_cache is None:
            return dict(prompt=spec.prompt)
        # By file hash and weight, so a replaced LoRA file never serves stale embeddings.
        lora_key = self.loras.text_encoder_key if self.loras is not None else ()
        # The encoders' identity too: models that do not share them do not share entries.
        encoders = (id(pipe.text_encoder), id(pipe.text_encoder_2))
        embeds, pooled = self.prompt_cache.embeddings(
            pipe, spec.prompt, (encoders, lora_key), max_sequence_length=self.family_info.max_sequence_length
        )
        return repeat_for_batch(embeds, pooled, images)

    def free_memory(self) -> None:
        """Return cached device memory to the driver (after an out-of-memory job)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _step_reporter(on_step: StepListener | None, spec: GenerationSpec, index: int, batches: int):
    if on_step is None:
        return None

    def report(step: int, steps: int, latents: torch.Tensor) -> None:
        on_step(StepEvent(step, steps, index, batches, latents, spec.width, spec.height))

    return report


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[0, 1] NCHW floats → PIL images, quantised on the device as diffusers' own "pil" output does."""
    as_uint8 = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    host = as_uint8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(frame) for frame in host]
