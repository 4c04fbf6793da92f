"""A bounded LRU of T5 + CLIP prompt embeddings, so a repeated prompt skips both text encoders."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch


class PromptEmbeddingCache:
    """Maps (prompt, extra key) to (T5 embeddings, pooled CLIP embedding) for one image.

    The extra key holds whatever else changes the encoders' output (the active LoRA set: a LoRA
    may patch the text encoders). Used from the engine's worker thread only, so no lock.
    Entries stay on the pipeline's device: ~4 MB each for FLUX.1-dev (512 x 4096 bf16).
    """

    def __init__(self, max_entries: int):
        self.max_entries = max(0, max_entries)
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def embeddings(
        self, pipe, prompt: str, extra_key: Hashable = (), max_sequence_length: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) for one image of `prompt`, from the cache or encoded now."""
        key = (prompt, extra_key, max_sequence_length)
        found = self._entries.get(key)
        if found is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return found
        self.misses += 1
        # Exactly the call FluxPipeline.__call__ makes, so cached and uncached runs match bit for bit.
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        if self.max_entries:
            self._entries[key] = (prompt_embeds, pooled)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return prompt_embeds, pooled

    def clear(self) -> None:
        self._entries.clear()


def repeat_for_batch(prompt_embeds: torch.Tensor, pooled: torch.Tensor, images: int) -> dict:
    """Pipeline kwargs for `images` images of one prompt.

    Given embeddings, the pipeline takes their batch as the prompt count and repeats nothing, so
    they are repeated here (as the pipeline's own encoder does) and one image per "prompt" asked.
    """
    return dict(
        prompt_embeds=prompt_embeds.repeat(images, 1, 1),
        pooled_prompt_embeds=pooled.repeat(images, 1),
        num_images_per_prompt=1,
    )
