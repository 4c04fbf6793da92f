"""Tiny LoRAs for the tiny FLUX, built with PEFT at run time (tests and benchmarks; no weights in git).

`make_lora` attaches a random PEFT LoRA to the tiny transformer (and optionally the CLIP text
encoder), takes its state dict and removes it again. `save_diffusers` writes it the way training
scripts do (`FluxPipeline.save_lora_weights`); `to_kohya` and `to_sd_scripts` rewrite the same
tensors in the kohya key layouts diffusers converts back on load.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DOUBLE_BLOCK_TARGETS = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"


@functools.cache
def _tiny_models():
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    return pipe.transformer, pipe.text_encoder


def _peft_state(model, prefix: str, targets, rank: int, scale: float, seed: int) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # "Already found a `peft_config`" on a second build
        warnings.simplefilter("ignore", UserWarning)
        inject_adapter_in_model(config, model, adapter_name="build")
    state = get_peft_model_state_dict(model, adapter_name="build")
    from diffusers.loaders.lora_base import delete_adapter_layers

    delete_adapter_layers(model, "build")
    model.peft_config.pop("build", None)
    # Scaled up so its effect on a random tiny model is well above rounding to 8 bits.
    return {
        f"{prefix}.{k}": (v * scale if "lora_B" in k else v).detach().clone().contiguous()
        for k, v in state.items()
    }


def make_lora(
    seed: int,
    rank: int = 4,
    scale: float = 4.0,
    transformer_targets=TRANSFORMER_TARGETS,
    text_encoder: bool = False,
) -> dict[str, torch.Tensor]:
    """A random LoRA in diffusers' PEFT layout: `transformer.<module>.lora_A.weight`, ..."""
    transformer, clip = _tiny_models()
    state = _peft_state(transformer, "transformer", transformer_targets, rank, scale, seed)
    if text_encoder:
        state.update(_peft_state(clip, "text_encoder", TEXT_ENCODER_TARGETS, rank, scale, seed + 10_000))
    return state


def save_diffusers(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Write with `FluxPipeline.save_lora_weights`, as diffusers' training scripts do."""
    from diffusers import FluxPipeline

    def part(prefix):
        return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}

    path = Path(path)
    FluxPipeline.save_lora_weights(
        path.parent,
        transformer_lora_layers=part("transformer") or None,
        text_encoder_lora_layers=part("text_encoder") or None,
        weight_name=path.name,
    )
    return path


def to_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya/ComfyUI layout over diffusers module names: `lora_transformer_<a_b_c>.lora_down.weight`."""
    out = {}
    for key, value in state.items():
        module, _, factor = key.rpartition(".lora_")
        component, _, rest = module.partition(".")
        prefix = "lora_transformer_" if component == "transformer" else "lora_te1_text_model_"
        stem = prefix + rest.replace(".", "_")
        if factor == "A.weight":
            out[f"{stem}.lora_down.weight"] = value
            out[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha == rank: scale 1
        else:
            out[f"{stem}.lora_up.weight"] = value
    return out


def to_sd_scripts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-scripts layout over BFL module names for double-block attention: fused `img_attn_qkv`."""
    out = {}
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.transformer_blocks.")})
    for i in blocks:
        base = f"transformer.transformer_blocks.{i}.attn"
        downs = [state[f"{base}.{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
        ups = [state[f"{base}.{p}.lora_B.weight"] for p in ("to_q", "to_k", "to_v")]
        rank = downs[0].shape[0]
        out[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight"] = torch.cat(downs)
        out[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_up.weight"] = torch.block_diag(*ups)
        out[f"lora_unet_double_blocks_{i}_img_attn_qkv.alpha"] = torch.tensor(float(3 * rank))
        proj = f"lora_unet_double_blocks_{i}_img_attn_proj"
        out[f"{proj}.lora_down.weight"] = state[f"{base}.to_out.0.lora_A.weight"]
        out[f"{proj}.lora_up.weight"] = state[f"{base}.to_out.0.lora_B.weight"]
        out[f"{proj}.alpha"] = torch.tensor(float(rank))
    return out


def save_raw(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
