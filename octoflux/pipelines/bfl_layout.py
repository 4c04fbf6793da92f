"""A FLUX.1 transformer's diffusers state dict in BFL's original key layout (what `flux1-dev.safetensors`
and city96's GGUF files use); ComfyUI's layout is the same under `model.diffusion_model.`.

The inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: a test converts the
result back with diffusers and gets the original tensors.
"""

from __future__ import annotations

import torch

COMFY_PREFIX = "model.diffusion_model."

GLOBAL_NAMES = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
DOUBLE_NAMES = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_NAMES = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def swap_scale_shift(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous orders (scale, shift); BFL's final layer (shift, scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key.split(".")[1] for key in state if key.startswith(prefix)})


def _renamed(state: dict, source: str, target: str, out: dict) -> None:
    for kind in ("weight", "bias"):
        if f"{source}.{kind}" in state:
            out[f"{target}.{kind}"] = state[f"{source}.{kind}"]


def _fused(state: dict, sources: tuple[str, ...], target: str, out: dict) -> None:
    for kind in ("weight", "bias"):
        out[f"{target}.{kind}"] = torch.cat([state[f"{source}.{kind}"] for source in sources], dim=0)


def diffusers_to_bfl(state: dict[str, torch.Tensor], comfy: bool = False) -> dict[str, torch.Tensor]:
    """BFL (or, with `comfy`, ComfyUI) keys for a diffusers FluxTransformer2DModel state dict."""
    out: dict[str, torch.Tensor] = {}
    for source, target in GLOBAL_NAMES.items():
        _renamed(state, source, target, out)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap_scale_shift(state[f"norm_out.linear.{kind}"])
    for i in range(_block_count(state, "transformer_blocks.")):
        _block(
            state,
            f"transformer_blocks.{i}.",
            f"double_blocks.{i}.",
            out,
            DOUBLE_NAMES,
            DOUBLE_NORMS,
            DOUBLE_FUSED,
        )
    for i in range(_block_count(state, "single_transformer_blocks.")):
        _block(
            state,
            f"single_transformer_blocks.{i}.",
            f"single_blocks.{i}.",
            out,
            SINGLE_NAMES,
            SINGLE_NORMS,
            SINGLE_FUSED,
        )
    return {COMFY_PREFIX + key: value for key, value in out.items()} if comfy else out


def _block(state, source, target, out, names, norms, fused) -> None:
    for name, bfl in names.items():
        _renamed(state, source + name, target + bfl, out)
    for name, bfl in norms.items():
        out[target + bfl] = state[source + name]
    for bfl, parts in fused.items():
        _fused(state, tuple(source + part for part in parts), target + bfl, out)
