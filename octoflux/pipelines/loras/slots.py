"""Hot-swap slots: a fixed set of LoRA adapters on a transformer that torch.compile has traced.

The slots are created before compilation with diffusers' `enable_lora_hotswap` at `max_rank`
over every transformer linear a LoRA may target. A request's LoRAs are hot-swapped into slots
(`load_lora_into_transformer(..., hotswap=True)`: weights copied in place, ranks zero-padded) and
weighted by filling the slots' scaling tensors, so changing LoRAs or weights never changes what
the compiled graphs guard on. An unused slot has scaling 0, which adds exactly zero.
"""

from __future__ import annotations

import warnings

import torch

from octoflux.pipelines import compat
from octoflux.pipelines.loras.adapters import Adapter, has_fused_qkv
from octoflux.pipelines.loras.files import LoraFile, LoraInvalid, ModuleShapes


def _zero_factors(transformer, shapes: ModuleShapes, rank: int) -> dict[str, torch.Tensor]:
    """Zero factors at `rank` on every transformer linear a LoRA may target: any valid LoRA swaps in."""
    param = next(transformer.parameters())
    seed = {}
    for full, (in_features, out_features) in shapes.items():
        component, _, module = full.partition(".")
        if component == "transformer":
            for factor, shape in (("A", (rank, in_features)), ("B", (out_features, rank))):
                seed[f"transformer.{module}.lora_{factor}.weight"] = torch.zeros(
                    shape, dtype=param.dtype, device=param.device
                )
    return seed


class LoraSlots:
    """A fixed set of hot-swappable adapters on the transformer; created before torch.compile."""

    def __init__(self, pipe, shapes: ModuleShapes, count: int, max_rank: int):
        from peft.tuners.lora import LoraLayer

        if has_fused_qkv(pipe.transformer):
            raise RuntimeError("create LoRA slots before fusing QKV projections (they target to_q/to_k/to_v)")
        self.pipe = pipe
        self.max_rank = max_rank
        self.names = [f"slot{i}" for i in range(count)]
        self.content: list[Adapter | None] = [None] * count  # which LoRA's weights sit in each slot
        self.weights: list[float] = [0.0] * count
        self._base: list[list[float]] = [[] for _ in range(count)]  # per-layer alpha/rank of the content
        transformer = pipe.transformer
        seed = _zero_factors(transformer, shapes, max_rank)
        for name in self.names:
            # diffusers runs PEFT's prepare_model_for_compiled_hotswap (scalings become tensors, ranks
            # are padded) on the next load only: arm it again for every slot.
            transformer.enable_lora_hotswap(target_rank=max_rank, check_compiled="ignore")
            with warnings.catch_warnings():  # "Already found a `peft_config`": several slots is the point
                warnings.simplefilter("ignore", UserWarning)
                compat.load_into_transformer(pipe, dict(seed), None, None, name)
        transformer.set_adapter(self.names)  # all slots always active; weights live in the scalings
        self.layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
        for layer in self.layers:
            for name in self.names:
                if not torch.is_tensor(layer.scaling.get(name)):
                    raise RuntimeError(f"slot {name} scaling was not made a tensor by enable_lora_hotswap")
                layer.scaling[name].fill_(0.0)

    def check(self, lora: LoraFile) -> None:
        if lora.rank > self.max_rank:
            raise LoraInvalid(
                lora.name,
                f"LoRA {lora.name!r} has rank {lora.rank}; this server hot-swaps LoRAs of rank up to "
                f"{self.max_rank} (--lora-max-rank)",
            )

    def assign(self, chosen: list[tuple[Adapter, float]]) -> None:
        """Put these LoRAs' transformer weights in slots (reusing slots that already hold them), weight
        them, and weight every other slot 0."""
        wanted: dict[int, float] = {}
        pending = []
        for entry, weight in chosen:
            held = next((i for i, c in enumerate(self.content) if c is entry and i not in wanted), None)
            if held is None:
                pending.append((entry, weight))
            else:
                wanted[held] = weight
        free = [i for i in range(len(self.names)) if i not in wanted]
        for (entry, weight), i in zip(pending, free, strict=False):
            self._swap(i, entry)
            wanted[i] = weight
        for i in range(len(self.names)):
            self._weigh(i, wanted.get(i, 0.0))

    def forget(self, entry: Adapter) -> None:
        for i, content in enumerate(self.content):
            if content is entry:
                self.content[i] = None

    def _swap(self, i: int, entry: Adapter) -> None:
        name = self.names[i]
        self.content[i] = None
        self.weights[i] = float("nan")  # the swap rewrote the scalings: weigh again
        state, alphas, metadata = entry.lora.prefixed("transformer")
        if metadata:
            metadata = {**metadata, "transformer.lora_dropout": 0.0}  # inference: dropout is a no-op
        try:
            compat.load_into_transformer(self.pipe, state, alphas, metadata, name, hotswap=True)
        except Exception as exc:
            for layer in self.layers:  # whatever half-swapped weights remain must not apply
                layer.scaling[name].fill_(0.0)
            self.weights[i] = 0.0
            raise LoraInvalid(entry.name, f"LoRA {entry.name!r} cannot be hot-swapped: {exc}") from exc
        # The swap set each layer's scaling to the new LoRA's alpha/rank; the request weight multiplies it.
        self._base[i] = torch.stack([layer.scaling[name] for layer in self.layers]).tolist()
        self.content[i] = entry

    def _weigh(self, i: int, weight: float) -> None:
        if self.weights[i] == weight:
            return
        name = self.names[i]
        base = self._base[i] if self.content[i] is not None else [0.0] * len(self.layers)
        for layer, scale in zip(self.layers, base, strict=True):
            layer.scaling[name].fill_(weight * scale)  # in place: a new value is no new graph
        self.weights[i] = weight
