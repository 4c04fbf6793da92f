"""LoRAs: the folder on disk and the adapters kept resident on the one pipeline.

- `files`: names, the `LoraLibrary` folder, `read_lora` (safety checks, key layouts, shapes).
- `adapters`: PEFT adapters attached to, detached from and activated on the transformer and CLIP.
- `slots`: hot-swap slots for a torch.compiled transformer (no recompiles on LoRA changes).
- `cache`: `LoraCache`, the least-recently-used set of resident adapters, with stats and events.
"""

from octoflux.pipelines.loras.cache import EVENTS, EventListener, LoraCache, LoraStats
from octoflux.pipelines.loras.files import (
    COMPONENTS,
    NAME_PATTERN,
    SUFFIX,
    LoraError,
    LoraFile,
    LoraInvalid,
    LoraLibrary,
    LoraNotFound,
    ModuleShapes,
    file_sha256,
    linear_shapes,
    lora_key,
    lora_name,
    read_lora,
)
from octoflux.pipelines.loras.slots import LoraSlots

__all__ = [
    "COMPONENTS",
    "EVENTS",
    "NAME_PATTERN",
    "SUFFIX",
    "EventListener",
    "LoraCache",
    "LoraError",
    "LoraFile",
    "LoraInvalid",
    "LoraLibrary",
    "LoraNotFound",
    "LoraSlots",
    "LoraStats",
    "ModuleShapes",
    "file_sha256",
    "linear_shapes",
    "lora_key",
    "lora_name",
    "read_lora",
]
