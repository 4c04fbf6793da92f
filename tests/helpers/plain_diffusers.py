"""The oracle for LoRA tests: plain diffusers, with none of our LoRA code on the path.

A `FluxPipeline` from the tiny checkpoint; LoRAs go on it only through `load_lora_weights`,
`set_adapters` and `disable_lora`, and images come from calling the pipeline directly.
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import pixels

from helpers.requests import STEPS
from octoflux.pipelines.loras import LoraLibrary


def adapter_name(lora: str) -> str:
    return lora.replace("-", "_").replace(".", "_")


class PlainDiffusers:
    def __init__(self, checkpoint: str, library: LoraLibrary):
        from diffusers import FluxPipeline

        self.library = library
        self.pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.loaded: set[str] = set()

    def use(self, loras: dict[str, float]) -> None:
        """Exactly these LoRAs at these weights, loading each file once with `load_lora_weights`."""
        for name in loras:
            if name not in self.loaded:
                self.pipe.load_lora_weights(str(self.library.path(name)), adapter_name=adapter_name(name))
                self.loaded.add(name)
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([adapter_name(n) for n in loras], list(loras.values()))
        elif self.loaded:
            self.pipe.disable_lora()

    def image(self, loras: dict[str, float], prompt: str, size: int, seed: int) -> np.ndarray:
        self.use(loras)
        image = self.pipe(
            prompt=prompt,
            width=size,
            height=size,
            num_inference_steps=STEPS,
            guidance_scale=3.5,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        return pixels(image).astype(np.int16)

    def components_with_loras(self) -> set[str]:
        components = ("transformer", "text_encoder")
        return {c for c in components if getattr(getattr(self.pipe, c), "peft_config", None)}
