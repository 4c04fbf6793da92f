"""PEFT adapters on the pipeline: attach one LoRA, detach it, choose which are active.

The transformer goes through diffusers' `load_lora_into_transformer`; CLIP through PEFT's
injector with diffusers' config (transformers 5's own `load_adapter` refuses PEFT < 0.22).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from octoflux.pipelines import compat
from octoflux.pipelines.loras.files import LoraFile

log = logging.getLogger(__name__)


@dataclass
class Adapter:
    """One LoRA resident on the pipeline."""

    name: str
    adapter: str  # PEFT adapter names may not contain "."; ours are made safe and unique
    fingerprint: tuple[int, int, int]
    sha256: str
    components: tuple[str, ...]
    rank: int
    lora: LoraFile | None = None  # slot mode: kept to hot-swap into a slot again without the disk


def file_fingerprint(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten (a touched file is told apart by hash)."""
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def has_fused_qkv(transformer) -> bool:
    return any(getattr(module, "fused_projections", False) for module in transformer.modules())


def _unfuse_qkv(transformer) -> None:
    """LoRAs target to_q/to_k/to_v; a fused to_qkv (--optimize compile) would silently bypass them."""
    if has_fused_qkv(transformer):
        log.warning("unfusing QKV projections so LoRAs apply (costs the fused-QKV speed-up)")
        transformer.unfuse_qkv_projections()


def attach(pipe, lora: LoraFile, adapter: str, transformer: bool = True) -> None:
    """Add `lora` as PEFT adapter `adapter` to each component it targets (the transformer only when
    `transformer`: in slot mode its weights go into slots instead). On failure nothing stays."""
    try:
        if transformer and "transformer" in lora.components:
            _attach_transformer(pipe, lora, adapter)
        if "text_encoder" in lora.components:
            _attach_text_encoder(pipe.text_encoder, lora, adapter)
    except Exception:
        detach(pipe, adapter)
        raise


def _attach_transformer(pipe, lora: LoraFile, adapter: str) -> None:
    _unfuse_qkv(pipe.transformer)
    state, alphas, metadata = lora.prefixed("transformer")
    compat.load_into_transformer(pipe, state, alphas, metadata, adapter)
    if adapter not in getattr(pipe.transformer, "peft_config", {}):
        raise RuntimeError("diffusers attached no layer from it")


def _attach_text_encoder(text_encoder, lora: LoraFile, adapter: str) -> None:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state = lora.tensors["text_encoder"]
    ranks = {k: v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
    metadata = (lora.metadata or {}).get("text_encoder") or None
    alphas = None if metadata else lora.alphas["text_encoder"] or None
    config = compat.text_encoder_lora_config(state, alphas, metadata, ranks)
    with warnings.catch_warnings():  # "Already found a `peft_config`": several adapters is the point
        warnings.simplefilter("ignore", UserWarning)
        inject_adapter_in_model(config, text_encoder, adapter_name=adapter)
    result = set_peft_model_state_dict(text_encoder, state, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise RuntimeError(f"unexpected keys {unexpected[:3]}")


def detach(pipe, adapter: str) -> None:
    """Remove an adapter's layers from every component that has them."""
    if adapter in getattr(pipe.transformer, "peft_config", {}):
        pipe.transformer.delete_adapters([adapter])
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is not None and adapter in getattr(text_encoder, "peft_config", {}):
        compat.delete_adapter_layers(text_encoder, adapter)


def activate(model, adapters: list[str], weights: list[float], is_text_encoder: bool) -> None:
    """Exactly `adapters` active on this model, or every LoRA layer bypassed when there are none."""
    present = set(getattr(model, "peft_config", {}) or {})
    chosen = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in present]
    names, scales = [a for a, _ in chosen], [w for _, w in chosen]
    if is_text_encoder:
        compat.set_text_encoder_adapters(model, names, scales)
    elif chosen:
        model.enable_lora()
        model.set_adapters(names, scales)
    elif compat.has_peft_layers(model):
        # PEFT layers stay wrapped around the base layers but forward to them untouched.
        model.disable_lora()
