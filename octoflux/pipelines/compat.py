"""Every private or undocumented diffusers/PEFT API this project relies on, each behind one function.

diffusers and PEFT may move any of these in a minor release; pyproject.toml pins the minors they
were tested with, and tests/unit/pipelines/test_compat.py has one test per entry that names the API when it
moves. Public, documented APIs are called directly elsewhere; only what is underscored, imported
from an internal module, or relies on an internal attribute belongs here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# ------------------------------------------------------------------ LoRA state dicts


def flux_lora_state_dict(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """diffusers' converters (kohya, XLabs, BFL, PEFT...) as `load_lora_weights` runs them."""
    from diffusers import FluxPipeline

    state, alphas = FluxPipeline.lora_state_dict(tensors, return_alphas=True)
    return state, dict(alphas or {})


def text_encoder_keys_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' pre-PEFT text-encoder keys (`self_attn.to_k_lora.down.weight`, what its kohya
    converter emits for `lora_te1_*`) → PEFT keys (`self_attn.k_proj.lora_A.weight`), by the two
    conversions diffusers' `_load_lora_into_text_encoder` applies."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))


def text_encoder_lora_config(state: dict, alphas: dict | None, metadata: dict | None, ranks: dict):
    """The `peft.LoraConfig` diffusers builds for a text-encoder state dict (private helper)."""
    from diffusers.utils.peft_utils import _create_lora_config

    return _create_lora_config(state, alphas, metadata, ranks, is_unet=False)


# ------------------------------------------------------------------ adapters on models


def load_into_transformer(pipe, state, alphas, metadata, adapter: str, hotswap: bool = False) -> None:
    """`load_lora_into_transformer`, passing the pipeline through its private `_pipeline` argument
    (diffusers uses it to lift and restore CPU offloading around the load)."""
    type(pipe).load_lora_into_transformer(
        state,
        network_alphas=alphas,
        transformer=pipe.transformer,
        adapter_name=adapter,
        metadata=metadata,
        _pipeline=pipe,
        hotswap=hotswap,
    )


def has_peft_layers(model) -> bool:
    """diffusers' own flag on a model that PEFT layers were ever added (private attribute)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def delete_adapter_layers(model, adapter: str) -> None:
    """Remove one adapter's layers from a model diffusers has no `delete_adapters` for (CLIP)."""
    from diffusers.loaders.lora_base import delete_adapter_layers as delete

    delete(model, adapter)
    model.peft_config.pop(adapter, None)


def set_text_encoder_adapters(text_encoder, adapters: list[str], weights: list[float]) -> None:
    """Exactly these adapters at these weights on the text encoder; none: every LoRA layer bypassed."""
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
        set_adapters_for_text_encoder,
    )

    if adapters:
        enable_lora_for_text_encoder(text_encoder)
        set_adapters_for_text_encoder(adapters, text_encoder, weights)
    else:
        disable_lora_for_text_encoder(text_encoder)  # a no-op on a model with no LoRA layers


# ------------------------------------------------------------------ First Block Cache


def observe_first_block_cache(transformer, record: Callable[[bool], None]) -> None:
    """Call `record(computed)` on each First Block Cache decision (True: the remaining blocks ran),
    by wrapping the leader hook's private `_should_compute_remaining_blocks`."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    head = transformer.transformer_blocks[0]
    hook = HookRegistry.check_if_exists_or_initialize(head).get_hook(_FBC_LEADER_BLOCK_HOOK)
    if hook is None:
        raise RuntimeError("First Block Cache is not enabled on this transformer")
    decide = hook._should_compute_remaining_blocks

    @torch.compiler.disable  # a host-side decision between blocks: a graph break either way
    def observed(residual: torch.Tensor) -> bool:
        computed = decide(residual)
        record(computed)
        return computed

    hook._should_compute_remaining_blocks = observed


def cache_context_check(transformer) -> Callable[[], bool]:
    """A function telling whether a cache context is set on the transformer's First Block Cache
    (the leader hook's private `state_manager._context`)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    head = transformer.transformer_blocks[0]
    hook = HookRegistry.check_if_exists_or_initialize(head).get_hook(_FBC_LEADER_BLOCK_HOOK)
    if hook is None:
        raise RuntimeError("First Block Cache is not enabled on this transformer")
    state_manager = hook.state_manager
    return lambda: state_manager._context is not None


def reset_step_cache(transformer) -> None:
    """Forget the cached residuals a cancelled run left (diffusers' private cache reset)."""
    transformer._reset_stateful_cache()


def execution_device(pipe) -> torch.device:
    """The device a pipeline runs its models on, offloading included (a private property)."""
    return pipe._execution_device


# ------------------------------------------------------------------ single-file transformers

FLUX1_WIDTH = 3072  # the width diffusers' BFL converter assumes for every FLUX.1 transformer


def flux_transformer_to_diffusers(checkpoint: dict, config: dict) -> dict:
    """diffusers' BFL/ComfyUI-to-diffusers converter for a FLUX.1 transformer state dict.

    The converter hard-codes FLUX.1's width (`inner_dim = 3072`) where it splits
    `single_blocks.N.linear1` into q, k, v and the MLP. A file of another width (the tiny model) has
    those tensors handed to it as meta placeholders of FLUX.1's size and split here by the width read
    from the file; FLUX.1-wide files go through the converter untouched.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    checkpoint = {key.removeprefix("model.diffusion_model."): value for key, value in checkpoint.items()}
    width = checkpoint["img_in.weight"].shape[0]
    if width == FLUX1_WIDTH:
        return convert_flux_transformer_checkpoint_to_diffusers(checkpoint, config=config)
    linear1 = {
        key: checkpoint[key] for key in checkpoint if key.startswith("single_blocks.") and ".linear1." in key
    }
    for key, tensor in linear1.items():
        rows = 3 * FLUX1_WIDTH + 4 * FLUX1_WIDTH
        checkpoint[key] = torch.empty((rows, *tensor.shape[1:]), device="meta")
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint, config=config)
    for key, tensor in linear1.items():
        _, block, _, kind = key.split(".")
        parts = torch.split(tensor, (width, width, width, tensor.shape[0] - 3 * width), dim=0)
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts, strict=True):
            converted[f"single_transformer_blocks.{block}.{name}.{kind}"] = part
    return converted


def gguf_parameter(data: torch.Tensor, quant_type) -> torch.Tensor:
    """A GGUF tensor as diffusers' GGUF quantizer expects it: raw bytes tagged with their quant type
    (diffusers' internal `GGUFParameter`); F32 and F16 tensors stay plain, as diffusers' reader
    leaves them."""
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    if quant_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data
    if quant_type not in SUPPORTED_GGUF_QUANT_TYPES:
        raise ValueError(f"GGUF type {quant_type.name} is not one diffusers can dequantize")
    return GGUFParameter(data, quant_type=quant_type)


def gguf_supported_type_names() -> list[str]:
    """The GGUF quant types diffusers dequantizes (its internal table), plus plain F32/F16."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return ["F32", "F16", *(kind.name for kind in SUPPORTED_GGUF_QUANT_TYPES)]


# ------------------------------------------------------------------ context parallelism
# Tested with two gloo ranks in tests/unit/pipelines/test_parallel.py (a process group per spawn).


def enable_parallelism(transformer, config, cp_plan: dict | None = None) -> None:
    """`transformer.enable_parallelism(config=..., cp_plan=...)`, also on a machine without an accelerator.

    diffusers' `_resolve_parallel_config` picks the rank's device as
    `rank % torch.accelerator.device_count()`, a ZeroDivisionError where no accelerator is present
    (gloo ranks on the CPU); the device it picks is unused there, so the count reads 1 while it runs.
    """
    count = torch.accelerator.device_count
    if count() > 0:
        transformer.enable_parallelism(config=config, cp_plan=cp_plan)
        return
    torch.accelerator.device_count = lambda: 1
    try:
        transformer.enable_parallelism(config=config, cp_plan=cp_plan)
    finally:
        torch.accelerator.device_count = count


def flux_plan_gathering_before_proj_out(transformer) -> dict | None:
    """FLUX's context-parallel plan (its private `_cp_plan`) with the sequence gathered after `norm_out`
    instead of after `proj_out`; None for a model without both.

    diffusers gathers the output of `proj_out`. A LoRA on `proj_out` (hot-swap slots, trainers'
    `final_layer`) makes PEFT wrap it: the gather hook stays on the inner Linear, so the LoRA's delta,
    computed on this rank's share of the tokens, is added to the gathered whole ("size of tensor a (1024)
    must match ... (512)"). Gathered one module earlier, `proj_out` and its LoRA see every token.
    """
    from diffusers.models._modeling_parallel import ContextParallelOutput

    plan = dict(getattr(transformer, "_cp_plan", None) or {})
    if "proj_out" not in plan or not hasattr(transformer, "norm_out"):
        return None
    del plan["proj_out"]
    plan["norm_out"] = ContextParallelOutput(gather_dim=1, expected_dims=3)
    return plan


def transformer_forward(transformer, **inputs) -> torch.Tensor:
    """The transformer's output tensor. Under diffusers' parallel hooks a model must be called with
    `return_dict=False` (its output hook gathers tensors, not output dataclasses); diffusers' own
    pipelines do so."""
    return transformer(**inputs, return_dict=False)[0]
