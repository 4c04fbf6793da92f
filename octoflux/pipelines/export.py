"""`octoflux export-transformer DIR FILE` and `export-text-encoder DIR FILE`: a diffusers folder's
transformer, or its T5 encoder, as one GGUF, fp8 or bf16 file.

GGUF (the `gguf` package) quantizes every 2-D weight whose rows split into whole blocks and keeps the
rest (biases, norm scales) in F32, as city96's FLUX files do; fp8 stores 2-D weights as float8 e4m3fn
and the rest as bf16, as ComfyUI's fp8 files do. `stored_kind` is that rule, and the memory estimate
uses it too. A T5 file keeps transformers' key names (as ComfyUI's `t5xxl_fp16.safetensors` does), or in
GGUF llama.cpp's `t5encoder` names (as city96's T5 GGUF files do).
"""

from __future__ import annotations

from pathlib import Path

import torch

from octoflux.pipelines.bfl_layout import diffusers_to_bfl
from octoflux.pipelines.export_formats import FORMATS as FORMATS
from octoflux.pipelines.export_formats import LAYOUTS as LAYOUTS

# T5 v1.1's relative positions have no fixed limit; 512 is what FLUX.1 pads T5's prompt to.
T5_CONTEXT_LENGTH = 512
SAFETENSORS_STORAGE = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16}


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why."""


def gguf_block(kind: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]


def stored_kind(shape: tuple[int, ...], file_format: str) -> str:
    """How a tensor of this shape is stored in a file of this format."""
    if file_format.startswith("gguf:"):
        kind = file_format.removeprefix("gguf:")
        block, _ = gguf_block(kind)
        return kind if len(shape) == 2 and shape[-1] % block == 0 else "F32"
    if file_format == "fp8":
        return "F8_E4M3" if len(shape) == 2 else "BF16"
    return "BF16"


def stored_bytes(shape: tuple[int, ...], kind: str) -> int:
    elements = 1
    for size in shape:
        elements *= size
    block, block_bytes = gguf_block(kind) if kind not in ("F8_E4M3", "BF16", "F32") else (1, 0)
    if block_bytes:
        return elements // block * block_bytes
    return elements * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[kind]


def folder_transformer_state(folder: Path, component: str = "transformer") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((folder / component).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no {component}/*.safetensors (not a diffusers-format FLUX folder)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def export_transformer(folder: Path, target: Path, file_format: str, layout: str = "bfl") -> Path:
    """Write the transformer of the diffusers folder `folder` to `target` in `file_format` and `layout`."""
    if file_format not in FORMATS:
        raise ExportError(f"--format {file_format!r}: choose one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    state = folder_transformer_state(Path(folder))
    if layout != "diffusers":
        state = diffusers_to_bfl(state, comfy=layout == "comfy")
    return _write(state, Path(target), file_format)


def export_text_encoder(folder: Path, target: Path, file_format: str) -> Path:
    """Write the T5 encoder (`text_encoder_2`) of the diffusers folder `folder` to `target`."""
    from octoflux.pipelines.text_encoder_file import T5_GGUF_ARCH, base_t5_config, t5_gguf_names

    if file_format not in FORMATS:
        raise ExportError(f"--format {file_format!r}: choose one of {', '.join(FORMATS)}")
    folder = Path(folder)
    state = folder_transformer_state(folder, "text_encoder_2")
    if not file_format.startswith("gguf:"):
        return _write(state, Path(target), file_format)
    config = base_t5_config(str(folder))
    names = t5_gguf_names(config)
    state = {names[name]: tensor for name, tensor in state.items()}
    return _write(state, Path(target), file_format, T5_GGUF_ARCH, lambda writer: _describe_t5(writer, config))


def _describe_t5(writer, config) -> None:
    """The `t5encoder` keys llama.cpp's and transformers' GGUF readers take the architecture from."""
    writer.add_context_length(T5_CONTEXT_LENGTH)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_key_length(config.d_kv)
    writer.add_value_length(config.d_kv)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)


def _write(
    state: dict[str, torch.Tensor], target: Path, file_format: str, arch: str = "flux", describe=None
) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if file_format.startswith("gguf:"):
        if target.suffix != ".gguf":
            raise ExportError(f"{target}: a GGUF file's name ends in .gguf")
        _write_gguf(state, target, file_format, arch, describe)
    else:
        if target.suffix != ".safetensors":
            raise ExportError(f"{target}: an {file_format} file's name ends in .safetensors")
        _write_safetensors(state, target, file_format)
    return target


def _write_gguf(
    state: dict[str, torch.Tensor], target: Path, file_format: str, arch: str, describe=None
) -> None:
    import gguf

    writer = gguf.GGUFWriter(target, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if describe is not None:
        describe(writer)
    for name, tensor in state.items():
        values = tensor.detach().to(torch.float32).numpy()
        kind = stored_kind(tuple(tensor.shape), file_format)
        if kind == "F32":
            writer.add_tensor(name, values)
        else:
            quant = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(values, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_safetensors(state: dict[str, torch.Tensor], target: Path, file_format: str) -> None:
    from safetensors.torch import save_file

    stored = {
        name: tensor.detach()
        .to(SAFETENSORS_STORAGE[stored_kind(tuple(tensor.shape), file_format)])
        .contiguous()
        for name, tensor in state.items()
    }
    save_file(stored, target, metadata={"format": "pt"})
