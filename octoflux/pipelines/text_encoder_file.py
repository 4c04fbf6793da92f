"""`--text-encoder-2 FILE`: a T5 encoder as one file (ComfyUI's `t5xxl_fp16` / `t5xxl_fp8_e4m3fn`
.safetensors in transformers' key names, or city96's T5 GGUF in llama.cpp's `t5encoder` names), served
with the base's T5 config and tokenizer.

- bf16/fp16/fp32 weights are cast to `--dtype` like a folder's;
- fp8 weights stay fp8 in memory (diffusers' layerwise casting), upcast per layer to `--dtype`;
- GGUF weights are dequantized to `--dtype` as they are read (as transformers' own GGUF loader does),
  so a GGUF T5 saves disk, not memory.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from octoflux.pipelines.load_progress import LoadProgress
from octoflux.pipelines.loader import ModelLoadError
from octoflux.pipelines.transformer_file import (
    FP8_KINDS,
    SAFETENSORS_DTYPES,
    StoredTensor,
    read_weight_file,
    shape_mismatches,
)

log = logging.getLogger(__name__)

FLAG = "--text-encoder-2"
T5_COMPONENT = "text_encoder_2"
T5_GGUF_ARCH = "t5encoder"
# T5EncoderModel's input embedding is `shared`; `encoder.embed_tokens` is the same tensor.
EMBEDDING, TIED_EMBEDDING = "shared.weight", "encoder.embed_tokens.weight"
# The feed-forward output projections, kept in float32 under fp16 as transformers' T5 loader keeps them.
WO_SUFFIX = ".wo.weight"


class TextEncoderFileError(ModelLoadError):
    """A `--text-encoder-2` file that cannot be served; the message is one line naming it."""


@dataclass
class TextEncoderFile:
    path: Path
    format: str  # "gguf" or "safetensors"
    tensors: dict[str, StoredTensor]  # under transformers' names (a GGUF's are translated)
    stored_names: dict[str, str] = field(default_factory=dict)  # transformers' name -> the file's

    @property
    def total_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors.values())

    @property
    def is_fp8(self) -> bool:
        return any(t.kind in FP8_KINDS for t in self.tensors.values())

    def error(self, what: str) -> TextEncoderFileError:
        return TextEncoderFileError(f"{FLAG} {self.path}: {what}")


def base_t5_config(base: str):
    from transformers import T5Config

    return T5Config.from_pretrained(base, subfolder=T5_COMPONENT)


def t5_gguf_names(config) -> dict[str, str]:
    """transformers' T5 encoder names -> llama.cpp's `t5encoder` GGUF names (gguf's own table)."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, config.num_layers)
    names = {}
    for name in _expected_shapes(config):
        module, suffix = name.rsplit(".", 1)
        stored = table.get_name(module)
        if stored is not None:
            names[name] = f"{stored}.{suffix}"
    return names


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    shapes.pop(TIED_EMBEDDING, None)
    return shapes


def check_text_encoder_file(path: str, base: str, quantize: str = "none") -> TextEncoderFile:
    """Everything that can be known before loading: a readable T5 encoder file matching the base's config."""
    path_ = Path(path).expanduser()

    def fail(what: str) -> TextEncoderFileError:
        return TextEncoderFileError(f"{FLAG} {path_}: {what}")

    file_format, tensors, metadata = read_weight_file(path_, fail)
    try:
        config = base_t5_config(base)
    except (OSError, ValueError) as exc:
        raise fail(f"--model {base} gives no T5 config to load it with ({exc})") from None
    if file_format == "gguf":
        architecture = metadata.get("general.architecture", "")
        if architecture != T5_GGUF_ARCH:
            raise fail(f"a GGUF of architecture {architecture!r}, not a T5 encoder ({T5_GGUF_ARCH})")
        found = _from_gguf(path_, tensors, config)
    else:
        if TIED_EMBEDDING in tensors and EMBEDDING not in tensors:
            tensors = {EMBEDDING: tensors[TIED_EMBEDDING], **tensors}
        tensors.pop(TIED_EMBEDDING, None)
        found = TextEncoderFile(path_, file_format, tensors, {name: name for name in tensors})
    if not any(name.startswith("encoder.block.") for name in found.tensors):
        some = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise found.error(f"not a T5 encoder (no encoder.block.* tensors; it holds {some}, ...)")
    _check_matches_base(found, config, base)
    if quantize != "none":
        raise found.error(f"--quantize {quantize} quantizes a folder's T5; a T5 file is served as stored")
    return found


def _from_gguf(path: Path, tensors: dict[str, StoredTensor], config) -> TextEncoderFile:
    from octoflux.pipelines.compat import gguf_supported_type_names

    supported = set(gguf_supported_type_names())
    unsupported = sorted({t.kind for t in tensors.values()} - supported)
    if unsupported:
        raise TextEncoderFileError(f"{FLAG} {path}: GGUF types {', '.join(unsupported)} cannot be read")
    to_stored = t5_gguf_names(config)
    from_stored = {stored: name for name, stored in to_stored.items()}
    # A name gguf's table does not know is kept as is, so the check below names it.
    renamed = {from_stored.get(stored, stored): tensor for stored, tensor in tensors.items()}
    stored_names = {name: to_stored.get(name, name) for name in renamed}
    return TextEncoderFile(path, "gguf", renamed, stored_names)


def _check_matches_base(found: TextEncoderFile, config, base: str) -> None:
    expected = _expected_shapes(config)
    shapes = {name: tensor.shape for name, tensor in found.tensors.items()}
    wrong = shape_mismatches(expected, shapes, found.stored_names)
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise found.error(f"does not match --model {base}'s T5 config: {wrong[0]}{more}")


def read_t5_tensors(found: TextEncoderFile, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors under transformers' names in `dtype` (GGUF dequantized), with progress lines."""
    progress = LoadProgress(f"{T5_COMPONENT} ({found.path.name})", found.total_bytes)
    tensors: dict[str, torch.Tensor] = {}
    if found.format == "gguf":
        import gguf

        names = {stored: name for name, stored in found.stored_names.items()}
        for tensor in gguf.GGUFReader(found.path).tensors:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            shape = found.tensors[names[tensor.name]].shape
            tensors[names[tensor.name]] = torch.from_numpy(values.copy()).reshape(shape).to(dtype)
            progress.advance(int(tensor.n_bytes))
    else:
        from safetensors import safe_open

        with safe_open(found.path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = handle.get_tensor(name)
                tensors[EMBEDDING if name == TIED_EMBEDDING else name] = tensor.to(dtype)
                progress.advance(tensor.nbytes)
    progress.finish()
    return tensors


def load_text_encoder_file(found: TextEncoderFile, base: str, dtype: torch.dtype):
    """A T5EncoderModel from `found` with the base's config, computing in `dtype`, on the CPU."""
    from transformers import T5EncoderModel

    config = base_t5_config(base)
    state = read_t5_tensors(found, dtype)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise found.error(f"could not be loaded: {str(exc).splitlines()[0]}") from None
    model.encoder.embed_tokens = model.shared
    if dtype == torch.float16:
        for name, module in model.named_modules():
            if f"{name}.weight".endswith(WO_SUFFIX):
                module.to(torch.float32)
    model.eval()
    if found.is_fp8:
        _keep_fp8_storage(model, found)
    kinds: dict[str, int] = {}
    for tensor in found.tensors.values():
        kinds[tensor.kind] = kinds.get(tensor.kind, 0) + tensor.nbytes
    log.info(
        "%s from %s (%s): %s",
        T5_COMPONENT,
        found.path.name,
        found.format,
        ", ".join(f"{kind} {size / 1e9:.2f} GB" for kind, size in kinds.items()),
    )
    return model


def kept_in_fp8(name: str, tensor: StoredTensor) -> bool:
    """Whether a T5 file's tensor stays fp8 in memory. Not the input embedding: the pipeline casts T5's
    output to the model's `dtype`, which transformers reads from its first parameter, `shared`. Not the
    feed-forward `wo`: T5 casts its input to `wo.weight.dtype` before calling it."""
    return tensor.kind in FP8_KINDS and name != EMBEDDING and not name.endswith(WO_SUFFIX)


def _keep_fp8_storage(model, found: TextEncoderFile) -> None:
    """Linears and embeddings whose weights came from fp8 stay fp8 in memory, upcast per forward."""
    from diffusers.hooks import apply_layerwise_casting

    kinds = {t.kind for t in found.tensors.values() if t.kind in FP8_KINDS}
    storage = SAFETENSORS_DTYPES["F8_E5M2" if kinds == {"F8_E5M2"} else "F8_E4M3"]
    modules = dict(model.named_modules())
    fp8 = {id(modules[n.removesuffix(".weight")]) for n, t in found.tensors.items() if kept_in_fp8(n, t)}
    # Every name of a module: the input embedding is `shared` and `encoder.embed_tokens`.
    skip = [
        f"^{re.escape(name)}$"
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding) and id(module) not in fp8
    ]
    apply_layerwise_casting(
        model, storage_dtype=storage, compute_dtype=model.dtype, skip_modules_pattern=tuple(skip) or None
    )
