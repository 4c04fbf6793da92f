"""Load a `--transformer FILE` (GGUF, fp8 or bf16 single file) as the FluxTransformer2DModel of a base model.

The file's tensors are read here, one by one with progress lines, converted to diffusers' names by
diffusers' own converter (octoflux.pipelines.compat), then handed to
`FluxTransformer2DModel.from_single_file` with the base's transformer config:
- GGUF stays quantized in memory (`GGUFQuantizationConfig`), dequantized per layer to `--dtype`;
- fp8 weights stay fp8 in memory (diffusers' layerwise casting), upcast per layer to `--dtype`;
- bf16/fp16/fp32 weights are cast to `--dtype` like a folder's.
"""

from __future__ import annotations

import logging
import re

import torch

from octoflux.pipelines import compat
from octoflux.pipelines.load_progress import LoadProgress
from octoflux.pipelines.transformer_file import (
    FP8_KINDS,
    SAFETENSORS_DTYPES,
    TransformerFile,
    check_matches_base,
    check_served,
    inspect_transformer_file,
)

log = logging.getLogger(__name__)

# Combinations a transformer file does not take, and why (checked before anything loads).
GGUF_OPTIMIZE_REFUSED = ("fp8", "cache")


def base_transformer_config(base: str) -> dict:
    from diffusers import FluxTransformer2DModel

    return dict(FluxTransformer2DModel.load_config(base, subfolder="transformer"))


def check_transformer_file(
    path: str, base: str, optimize: str = "none", quantize: str = "none"
) -> TransformerFile:
    """Everything that can be known before loading: a readable FLUX.1 file, served, matching the base."""
    found = inspect_transformer_file(path)
    check_served(found)
    try:
        config = base_transformer_config(base)
    except (OSError, ValueError) as exc:
        raise found.error(f"--model {base} gives no transformer config to load it with ({exc})") from None
    check_matches_base(found, config, base)
    if quantize != "none":
        raise found.error(
            f"--quantize {quantize} quantizes a folder's weights; a transformer file is served as stored"
        )
    if optimize == "compile" and found.format == "gguf":
        # diffusers' GGUFParameter cannot be traced by dynamo (torch 2.13, diffusers 0.42; compat test).
        raise found.error(
            "--optimize compile cannot trace a GGUF transformer (torch.compile does not support diffusers' "
            "GGUF tensors); serve it without --optimize, or use a bf16 or fp8 file"
        )
    if optimize in GGUF_OPTIMIZE_REFUSED and (found.format == "gguf" or found.is_fp8):
        raise found.error(
            f"--optimize {optimize} requantizes the transformer's linears to fp8; use it with a bf16 file, "
            "or --optimize compile"
        )
    return found


def read_tensors(found: TransformerFile) -> dict[str, torch.Tensor]:
    """The file's tensors (GGUF ones as diffusers' tagged raw bytes), logging progress as they are read."""
    progress = LoadProgress(f"transformer ({found.path.name})", found.total_bytes)
    tensors: dict[str, torch.Tensor] = {}
    if found.format == "gguf":
        import gguf

        for tensor in gguf.GGUFReader(found.path).tensors:
            data = torch.from_numpy(tensor.data.copy())
            tensors[tensor.name] = compat.gguf_parameter(data, tensor.tensor_type)
            progress.advance(int(tensor.n_bytes))
    else:
        from safetensors import safe_open

        with safe_open(found.path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[name] = handle.get_tensor(name)
                progress.advance(tensors[name].nbytes)
    progress.finish()
    return tensors


def load_transformer_file(found: TransformerFile, base: str, dtype: torch.dtype):
    """A FluxTransformer2DModel from `found` with the base's config, computing in `dtype`, on the CPU."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    config = base_transformer_config(base)
    checkpoint = read_tensors(found)
    if found.layout != "diffusers":
        checkpoint = compat.flux_transformer_to_diffusers(checkpoint, config)
    quantization = GGUFQuantizationConfig(compute_dtype=dtype) if found.format == "gguf" else None
    try:
        model = FluxTransformer2DModel.from_single_file(
            checkpoint,
            config=base,
            subfolder="transformer",
            quantization_config=quantization,
            torch_dtype=dtype,
        )
    except (ValueError, RuntimeError) as exc:
        raise found.error(f"could not be loaded: {str(exc).splitlines()[0]}") from None
    if found.is_fp8:
        _keep_fp8_storage(model, found)
    log.info(
        "transformer from %s (%s, %s layout): %s",
        found.path.name,
        found.format,
        found.layout,
        ", ".join(f"{kind} {size / 1e9:.2f} GB" for kind, size in found.kinds.items()),
    )
    return model


def _keep_fp8_storage(model, found: TransformerFile) -> None:
    """Linears whose weights came from fp8 (they round-trip exactly) stay fp8 in memory and are upcast
    per forward; the rest stays in the compute dtype. Such a layer's bias is stored in fp8 too."""
    kinds = {t.kind for t in found.tensors.values() if t.kind in FP8_KINDS}
    storage = SAFETENSORS_DTYPES["F8_E5M2" if kinds == {"F8_E5M2"} else "F8_E4M3"]
    skip = [
        f"^{re.escape(name)}$"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not _exact_in(module.weight, storage)
    ]
    model.enable_layerwise_casting(
        storage_dtype=storage, compute_dtype=model.dtype, skip_modules_pattern=("pos_embed", *skip)
    )


def _exact_in(weight: torch.Tensor, storage: torch.dtype) -> bool:
    return bool(torch.equal(weight.detach().to(storage).to(weight.dtype), weight.detach()))
