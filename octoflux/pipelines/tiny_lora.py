"""Tiny LoRAs for the tiny FLUX, built with PEFT at run time (tests and benchmarks; no weights in git).

`make_lora` attaches a random PEFT LoRA to the tiny transformer (and optionally the CLIP text
encoder), takes its state dict and removes it again. `save_diffusers` writes it the way training
scripts do (`FluxPipeline.save_lora_weights`); the `to_*` functions rewrite it in the other key
layouts diffusers' `load_lora_weights` converts on load:

- `to_kohya`: kohya keys over diffusers module names (`lora_transformer_*`, `lora_te1_*`);
- `to_sd_scripts`: kohya/sd-scripts keys over BFL module names (`lora_unet_double_blocks_*`,
  CLIP as `lora_te1_*`), as kohya's sd-scripts writes FLUX LoRAs;
- `to_comfyui`: the same BFL names the way ComfyUI saves them (`diffusion_model.double_blocks.*`,
  CLIP as `text_encoders.clip_l.transformer.*`);
- `to_xlabs`: XLabs' attention-processor keys (`double_blocks.N.processor.qkv_lora1.down.weight`).

The BFL-named layouts cover double-block image attention (use `DOUBLE_BLOCK_TARGETS`) and CLIP:
diffusers' sd-scripts converter hard-codes FLUX.1's full widths for `single_blocks.N.linear1`, so
files for the tiny model leave single blocks out.
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
    from octoflux.pipelines.tiny import build_tiny_pipeline

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


def _bfl_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """BFL/CLIP module name → (lora_down, lora_up, alpha) for the double-block image attention and
    CLIP layers in `state`; q/k/v become one fused `qkv` LoRA of three times the rank."""
    modules = {}
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.transformer_blocks.")})
    for i in blocks:
        base = f"transformer.transformer_blocks.{i}.attn"
        downs = [state[f"{base}.{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
        ups = [state[f"{base}.{p}.lora_B.weight"] for p in ("to_q", "to_k", "to_v")]
        rank = downs[0].shape[0]
        modules[f"double_blocks.{i}.img_attn.qkv"] = (torch.cat(downs), torch.block_diag(*ups), 3.0 * rank)
        down, up = state[f"{base}.to_out.0.lora_A.weight"], state[f"{base}.to_out.0.lora_B.weight"]
        modules[f"double_blocks.{i}.img_attn.proj"] = (down, up, float(rank))
    for key, down in state.items():
        if key.startswith("text_encoder.") and key.endswith(".lora_A.weight"):
            module = key.removeprefix("text_encoder.").removesuffix(".lora_A.weight")
            up = state[key.replace(".lora_A.", ".lora_B.")]
            name = module if module.startswith("text_model.") else f"text_model.{module}"
            modules[f"clip:{name}"] = (down, up, float(down.shape[0]))
    return modules


def _kohya_factors(modules, transformer_prefix: str, clip_prefix: str, flatten: bool) -> dict:
    out = {}
    for module, (down, up, alpha) in modules.items():
        prefix = clip_prefix if module.startswith("clip:") else transformer_prefix
        name = module.removeprefix("clip:")
        stem = prefix + (name.replace(".", "_") if flatten else name)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def to_sd_scripts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya/sd-scripts layout over BFL module names: `lora_unet_double_blocks_0_img_attn_qkv`, and
    CLIP as `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` when `state` has it."""
    return _kohya_factors(_bfl_modules(state), "lora_unet_", "lora_te1_", flatten=True)


def to_comfyui(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's layout of the same: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`
    and `text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj...`."""
    return _kohya_factors(
        _bfl_modules(state), "diffusion_model.", "text_encoders.clip_l.transformer.", flatten=False
    )


def to_xlabs(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs' layout of double-block image attention: one down for q/k/v (to_q's), ups stacked.

    XLabs shares the down factor across q, k and v, so this is a different LoRA from `state` (to_k
    and to_v get to_q's down); it is the file both loaders must read alike. No alphas (scale 1).
    """
    out = {}
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.transformer_blocks.")})
    for i in blocks:
        base = f"transformer.transformer_blocks.{i}.attn"
        ups = [state[f"{base}.{p}.lora_B.weight"] for p in ("to_q", "to_k", "to_v")]
        out[f"double_blocks.{i}.processor.qkv_lora1.down.weight"] = state[f"{base}.to_q.lora_A.weight"]
        out[f"double_blocks.{i}.processor.qkv_lora1.up.weight"] = torch.cat(ups)
        out[f"double_blocks.{i}.processor.proj_lora1.down.weight"] = state[f"{base}.to_out.0.lora_A.weight"]
        out[f"double_blocks.{i}.processor.proj_lora1.up.weight"] = state[f"{base}.to_out.0.lora_B.weight"]
    return out


def save_raw(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
