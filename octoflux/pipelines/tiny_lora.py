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

The `*_file` functions write random LoRAs shaped like real trainers' output instead (every module
the trainer targets, alphas where it writes them, bf16 as trainers save), straight from the tiny
model's layer shapes: `sd_scripts_file` (kohya's sd-scripts, CLIP as `lora_te1_*`; also ComfyUI's
`diffusion_model.*` naming of the same), `ai_toolkit_file` (diffusers/PEFT names, no PEFT config
in the header) and `xlabs_file` (both attention streams of every double block).
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


def save_raw(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------ trainer-shaped files

TRAINER_DTYPE = torch.bfloat16

# sd-scripts' FLUX LoRA modules (BFL names) → the diffusers layers each covers (q/k/v fused).
# single_blocks.N.linear1 is left out: diffusers' converter asserts FLUX.1's full widths on it.
SD_SCRIPTS_DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SD_SCRIPTS_SINGLE_BLOCK = {"linear2": ("proj_out",), "modulation.lin": ("norm.linear",)}
# What sd-scripts trains with `--network_args in_dims=[...]`: the embedders outside the blocks.
SD_SCRIPTS_EMBEDDERS = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
}
# sd-scripts' CLIP-L modules per encoder layer (kohya name → CLIP layer).
CLIP_MODULES = {
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
}


def _linear(model, name: str) -> torch.nn.Linear:
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module)  # a layer that once held a PEFT LoRA stays wrapped


def _span(model, layers) -> tuple[int, int]:
    """(in, out) of one trainer module covering `layers` of `model` (fused ones stack outputs)."""
    linears = [_linear(model, layer) for layer in layers]
    return linears[0].in_features, sum(linear.out_features for linear in linears)


def _block_linears(transformer) -> list[str]:
    """Names of every linear layer inside the transformer's blocks."""
    return [
        name.replace(".base_layer", "")
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and ".lora_" not in name
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]


def _random_factors(generator, shape: tuple[int, int], rank: int, strength: float, dtype):
    in_features, out_features = shape
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) * strength / rank**0.5
    return down.to(dtype), up.to(dtype)


def _clip_layers(clip):
    return getattr(clip, "text_model", clip).encoder.layers  # transformers 5 dropped `text_model`


def _bfl_shapes(transformer, embedders: bool) -> dict[str, tuple[int, int]]:
    """BFL module name (`double_blocks.0.img_attn.qkv`) → (in, out) on the tiny transformer."""
    modules = {}
    for i, block in enumerate(transformer.transformer_blocks):
        for name, layers in SD_SCRIPTS_DOUBLE_BLOCK.items():
            modules[f"double_blocks.{i}.{name}"] = _span(block, layers)
    for i, block in enumerate(transformer.single_transformer_blocks):
        for name, layers in SD_SCRIPTS_SINGLE_BLOCK.items():
            modules[f"single_blocks.{i}.{name}"] = _span(block, layers)
    for name, layers in (SD_SCRIPTS_EMBEDDERS if embedders else {}).items():
        modules[name] = _span(transformer, layers)
    return modules


def sd_scripts_file(
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    clip: tuple[str, ...] = tuple(CLIP_MODULES),
    embedders: bool = False,
    comfyui: bool = False,
    strength: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A random LoRA as kohya's sd-scripts writes it for FLUX.1: every double-block module and
    single-block linear2/modulation (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`),
    `clip` modules of every CLIP layer (`lora_te1_text_model_encoder_layers_0_mlp_fc1`), an `.alpha`
    per module, bf16. `embedders`: also img_in/txt_in/time_in (sd-scripts' `in_dims`). `comfyui`:
    the same modules as ComfyUI names them (`diffusion_model.double_blocks.0.img_attn.qkv`,
    `text_encoders.clip_l.transformer.text_model...`)."""
    transformer, clip_model = _tiny_models()
    modules = {
        ("diffusion_model." + name if comfyui else "lora_unet_" + name.replace(".", "_")): shape
        for name, shape in _bfl_shapes(transformer, embedders).items()
    }
    for i, layer in enumerate(_clip_layers(clip_model)):
        for kohya_name in clip:
            module = CLIP_MODULES[kohya_name]
            stem = f"text_model.encoder.layers.{i}.{module}"
            key = (
                "text_encoders.clip_l.transformer." + stem
                if comfyui
                else "lora_te1_" + stem.replace(".", "_")
            )
            modules[key] = _span(layer, [module])
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for stem, shape in modules.items():
        down, up = _random_factors(generator, shape, rank, strength, TRAINER_DTYPE)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=TRAINER_DTYPE)
    return out


def ai_toolkit_file(
    seed: int, rank: int = 4, alpha: float | None = None, strength: float = 1.0
) -> dict[str, torch.Tensor]:
    """A random LoRA as ai-toolkit writes FLUX LoRAs: diffusers/PEFT names for every linear layer of
    every block (`transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight`), bf16, with no
    PEFT config in the header. `alpha`: also an `.alpha` per module, as some trainers add."""
    transformer, _ = _tiny_models()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in _block_linears(transformer):
        down, up = _random_factors(generator, _span(transformer, [name]), rank, strength, TRAINER_DTYPE)
        out[f"transformer.{name}.lora_A.weight"] = down
        out[f"transformer.{name}.lora_B.weight"] = up
        if alpha is not None:
            out[f"transformer.{name}.alpha"] = torch.tensor(alpha, dtype=TRAINER_DTYPE)
    return out


def xlabs_file(seed: int, rank: int = 4, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """A random LoRA as XLabs' x-flux trainer writes it: image (`qkv_lora1`, `proj_lora1`) and text
    (`qkv_lora2`, `proj_lora2`) attention of every double block, `down`/`up` factors, no alphas."""
    transformer, _ = _tiny_models()
    processors = {
        "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "proj_lora1": ("attn.to_out.0",),
        "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "proj_lora2": ("attn.to_add_out",),
    }
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for i, block in enumerate(transformer.transformer_blocks):
        for name, layers in processors.items():
            down, up = _random_factors(generator, _span(block, layers), rank, strength, TRAINER_DTYPE)
            out[f"double_blocks.{i}.processor.{name}.down.weight"] = down
            out[f"double_blocks.{i}.processor.{name}.up.weight"] = up
    return out
