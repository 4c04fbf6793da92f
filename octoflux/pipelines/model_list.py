"""`--model`: one model, or a list of `id=SOURCE` entries served side by side.

    --model /m/FLUX.1-dev
    --model flux-dev=/m/FLUX.1-dev,flux-kontext-dev=/m/FLUX.1-Kontext-dev,flux-fill-dev=/m/FLUX.1-Fill-dev
    --model flux-dev=/m/FLUX.1-dev+/m/flux1-dev-Q8_0.gguf      (a base folder + a transformer file)
    --model tiny-family                                         (the four tiny models)

An id is the model id routes and `/v1/models` use (flux-dev, flux-schnell, flux-kontext-dev,
flux-fill-dev); without one it comes from the checkpoint once that can be read.
"""

from __future__ import annotations

from dataclasses import dataclass

from octoflux.pipelines.family import FAMILIES, FLUX_DEV, FLUX_FILL_DEV, FLUX_KONTEXT_DEV, FLUX_SCHNELL

TINY_SCHNELL = "tiny-schnell"
# `--model tiny-<variant>` names (besides `tiny`, which is dev); `tiny-family` serves them all.
TINY_MODELS = {"tiny": "dev", TINY_SCHNELL: "schnell", "tiny-kontext": "kontext", "tiny-fill": "fill"}
TINY_FAMILY = "tiny-family"
TRANSFORMER_SEPARATOR = "+"
TINY_FAMILY_MODELS = {
    FLUX_DEV: "tiny",
    FLUX_SCHNELL: TINY_SCHNELL,
    FLUX_KONTEXT_DEV: "tiny-kontext",
    FLUX_FILL_DEV: "tiny-fill",
}


class ModelListError(ValueError):
    """`--model` cannot be read as one model or a list; the message is one line."""


@dataclass(frozen=True)
class ModelEntry:
    """One served model: its id (None: the checkpoint's family), where it loads from, an optional file."""

    id: str | None
    source: str
    transformer_file: str = ""

    @property
    def label(self) -> str:
        return self.id or self.source


def parse_model_list(value: str) -> list[ModelEntry]:
    """The entries `--model` names; `ModelListError` for an unknown id, an empty entry or an id twice."""
    value = value.strip()
    if value == TINY_FAMILY:
        return [ModelEntry(model_id, source) for model_id, source in TINY_FAMILY_MODELS.items()]
    items = [item.strip() for item in value.split(",")] if "," in value or "=" in value else [value]
    entries = [_entry(item) for item in items]
    seen: set[str] = set()
    for entry in entries:
        if entry.id is not None and entry.id in seen:
            raise ModelListError(f"--model names {entry.id} twice; serve each model once")
        if entry.id is not None:
            seen.add(entry.id)
    return entries


def _entry(item: str) -> ModelEntry:
    if not item:
        raise ModelListError("--model has an empty entry (two commas, or a trailing comma)")
    model_id, equals, rest = item.partition("=")
    if not equals:
        model_id, rest = "", item
    model_id = model_id.strip()
    if equals and model_id not in FAMILIES:
        raise ModelListError(f"--model: unknown model id {model_id!r}; use one of {', '.join(FAMILIES)}")
    source, plus, transformer_file = rest.partition(TRANSFORMER_SEPARATOR)
    if not source.strip() or (plus and not transformer_file.strip()):
        raise ModelListError(f"--model {item!r}: expected ID=SOURCE or ID=BASE+TRANSFORMER_FILE")
    return ModelEntry(model_id or None, source.strip(), transformer_file.strip())
