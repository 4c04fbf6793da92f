"""Will the model fit? An estimate from safetensors headers (never the tensors) against what the device has.

Weights are counted per component in the dtype they will be loaded in; `--quantize` stores the
transformer and T5 at about 1 byte (fp8, int8) or half a byte (nf4) per weight; offload keeps the
weights in host memory and only the largest component (`model`) or a few layers (`sequential`) on
the GPU. A working-memory margin is added for activations, the VAE decode and allocator slack.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 2**30
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
QUANTIZED_COMPONENTS = ("transformer", "text_encoder_2")
QUANTIZED_BYTES_PER_WEIGHT = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5}
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# GGUF tensors diffusers loads as plain tensors in the load dtype; every other GGUF type stays as stored.
GGUF_PLAIN_KINDS = {"F32", "F16"}
# Activations, the VAE decode at 1024x1024 and allocator slack: a share of the weights plus a floor.
MARGIN_SHARE = 0.15
MARGIN_FLOOR = 256 * 2**20
# Sequential and group offload hold about one block (group: two, the next prefetched) at a time on the GPU.
SEQUENTIAL_DEVICE_BYTES = 2 * GIB


class WillNotFit(RuntimeError):
    """The model needs more memory than the device has; the message says how much and the ways out."""


@dataclass
class Weights:
    """Weight counts per component: floating-point elements (cast to the load dtype) and other bytes."""

    float_elements: dict[str, int] = field(default_factory=dict)
    other_bytes: dict[str, int] = field(default_factory=dict)
    # Real weights are quantized as they load; random-full is built whole, then quantized (peak unquantized).
    quantized_while_loading: bool = True

    def add(self, component: str, floats: int, other: int = 0) -> None:
        self.float_elements[component] = self.float_elements.get(component, 0) + floats
        self.other_bytes[component] = self.other_bytes.get(component, 0) + other


@dataclass
class MemoryEstimate:
    components: dict[str, int]  # bytes per component as loaded
    device_bytes: int  # on the chosen device (GPU memory, or RAM on a CPU), margin included
    host_bytes: int  # in host RAM besides (offloaded weights); 0 without offload


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: tensor names, dtypes and shapes (no tensor data read)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _count_file(weights: Weights, component: str, path: Path) -> None:
    floats = other = 0
    for entry in read_safetensors_header(path).values():
        elements = 1
        for size in entry["shape"]:
            elements *= size
        if entry["dtype"] in FLOAT_DTYPES:
            floats += elements
        else:
            other += elements * SAFETENSORS_DTYPE_BYTES.get(entry["dtype"], 4)
    weights.add(component, floats, other)


def weight_files(folder: Path) -> list[Path]:
    """A component's .safetensors files; of a plain and a variant copy (`x.fp16.safetensors`), the plain."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]
    return plain or files


def count_folder(folder: Path) -> Weights | None:
    """Weights of a diffusers-format folder from its headers; None when a component has no safetensors."""
    weights = Weights()
    for component in COMPONENTS:
        files = weight_files(folder / component)
        if not files:
            return None
        for path in files:
            _count_file(weights, component, path)
    return weights


def count_random_full() -> Weights:
    """FLUX.1-dev's architecture sized on the meta device (no memory allocated)."""
    from octoflux.pipelines.random_full import build_components

    weights = Weights(quantized_while_loading=False)
    for name, model in build_components("meta", torch.float32).items():
        weights.add(name, sum(p.numel() for p in model.parameters()))
    return weights


def count_transformer_file(weights: Weights, path: str) -> None:
    """A `--transformer` file as loaded: GGUF quantized tensors and fp8 weights keep their stored bytes
    (dequantized or upcast per layer); float tensors are cast to the load dtype."""
    from octoflux.pipelines.transformer_file import inspect_transformer_file

    found = inspect_transformer_file(path)
    cast = GGUF_PLAIN_KINDS if found.format == "gguf" else FLOAT_DTYPES
    for tensor in found.tensors.values():
        if tensor.kind in cast:
            weights.add("transformer", tensor.elements)
        elif found.format == "gguf":
            weights.add("transformer", 0, tensor.nbytes)
        else:  # fp8 stays fp8 (octoflux.pipelines.single_file)
            weights.add("transformer", 0, tensor.elements * SAFETENSORS_DTYPE_BYTES.get(tensor.kind, 4))


def count_text_encoder_file(weights: Weights, path: str, base: str) -> None:
    """A `--text-encoder-2` file as loaded: fp8 weights kept fp8 at 1 byte (octoflux.pipelines.
    text_encoder_file); everything else, GGUF included (dequantized as read), in the load dtype."""
    from octoflux.pipelines.text_encoder_file import T5_COMPONENT, check_text_encoder_file, kept_in_fp8

    found = check_text_encoder_file(path, base)
    for name, tensor in found.tensors.items():
        if kept_in_fp8(name, tensor):
            weights.add(T5_COMPONENT, 0, tensor.elements)
        else:
            weights.add(T5_COMPONENT, tensor.elements)


def count_weights(source: str, transformer_file: str = "", text_encoder_file: str = "") -> Weights | None:
    """Weights of what `load_flux_pipeline(source, transformer_file=..., text_encoder_file=...)` would
    load, or None where headers are not at hand."""
    from octoflux.pipelines.loader import RANDOM_FULL

    if transformer_file or text_encoder_file:
        replaced = {"transformer"} if transformer_file else set()
        replaced |= {"text_encoder_2"} if text_encoder_file else set()
        base = _base_weights(source, replaced)
        if base is None:
            return None
        if transformer_file:
            count_transformer_file(base, transformer_file)
        if text_encoder_file:
            count_text_encoder_file(base, text_encoder_file, source)
        return base
    if source == RANDOM_FULL:
        return count_random_full()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        # A single-file checkpoint holds the transformer (text encoders and VAE come from elsewhere).
        weights = Weights()
        _count_file(weights, "transformer", path)
        return weights
    if path.is_dir():
        return count_folder(path)
    return _hub_folder_weights(source)


@dataclass
class SetWeights:
    """The weights of several models, each shared component counted once."""

    weights: Weights
    # model label -> {component: the label of the model whose copy it uses}
    shared: dict[str, dict[str, str]] = field(default_factory=dict)
    # what the shared copies would have taken: floating-point elements and other bytes
    shared_elements: int = 0
    shared_other_bytes: int = 0

    def describe(self) -> str:
        """`text_encoder, vae loaded once (flux-fill-dev uses flux-dev's)`, or "nothing shared"."""
        components = sorted({c for taken in self.shared.values() for c in taken})
        if not components:
            return "nothing shared"
        users = ", ".join(self.shared)
        owners = sorted({owner for taken in self.shared.values() for owner in taken.values()})
        return f"{', '.join(components)} loaded once ({users} use {', '.join(owners)}'s)"


def count_model_set(models: list[tuple[str, str, str]]) -> SetWeights | None:
    """Weights of (label, source, transformer file) models served together, or None where headers are not
    at hand. A text encoder or VAE whose files have the names and sizes of one already counted is counted
    once: loading shares it when its hash matches too (octoflux.pipelines.shared_components)."""
    from octoflux.pipelines.shared_components import Fingerprint, component_folder

    total = SetWeights(Weights())
    seen: dict[tuple[str, tuple], str] = {}
    for index, (label, source, transformer_file) in enumerate(models):
        weights = count_weights(source, transformer_file)
        if weights is None:
            return None
        for component, floats in weights.float_elements.items():
            other = weights.other_bytes.get(component, 0)
            folder = component_folder(source, component) if component != "transformer" else None
            key = (component, Fingerprint.of(folder).sizes) if folder is not None else None
            if key is not None and key in seen:
                total.shared.setdefault(label, {})[component] = seen[key]
                total.shared_elements += floats
                total.shared_other_bytes += other
                continue
            if key is not None:
                seen[key] = label
            total.weights.add(component if index == 0 else f"{label} {component}", floats, other)
    return total


def _base_weights(source: str, replaced: set[str]) -> Weights | None:
    """Every component of a base folder (or cached hub id) but those files replace."""
    from huggingface_hub import try_to_load_from_cache

    folder = Path(source).expanduser()
    if not folder.is_dir():
        index = try_to_load_from_cache(source, "model_index.json")
        if not isinstance(index, str):
            return None
        folder = Path(index).parent
    weights = Weights()
    for component in COMPONENTS:
        if component in replaced:
            continue
        files = weight_files(folder / component)
        if not files:
            return None
        for path in files:
            _count_file(weights, component, path)
    return weights


def _hub_folder_weights(repo_id: str) -> Weights | None:
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(repo_id, "model_index.json")
    return count_folder(Path(index).parent) if isinstance(index, str) else None


def estimate(
    weights: Weights, dtype: torch.dtype, quantize: str = "none", offload: str = "none"
) -> MemoryEstimate:
    element_bytes = torch.empty((), dtype=dtype).element_size()
    components = {}
    for name, floats in weights.float_elements.items():
        per_weight = element_bytes
        # Several models: "flux-kontext-dev transformer" is a transformer too.
        component = name.rpartition(" ")[2]
        if quantize != "none" and weights.quantized_while_loading and component in QUANTIZED_COMPONENTS:
            per_weight = min(element_bytes, QUANTIZED_BYTES_PER_WEIGHT[quantize])
        components[name] = int(floats * per_weight) + weights.other_bytes.get(name, 0)
    total = sum(components.values())
    margin = int(MARGIN_SHARE * total) + MARGIN_FLOOR
    if offload == "none":
        return MemoryEstimate(components, device_bytes=total + margin, host_bytes=0)
    on_device = max(components.values()) if offload == "model" else min(total, SEQUENTIAL_DEVICE_BYTES)
    # group and sequential: a few blocks on the device
    return MemoryEstimate(components, device_bytes=on_device + margin, host_bytes=total)


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        return available_ram()
    return None


def _gb(size: int) -> str:
    return f"{size / GIB:.1f} GB"


def check_fits(
    need: MemoryEstimate,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str = "none",
    offload: str = "none",
    device_free: int | None = None,
    host_free: int | None = None,
) -> None:
    """Raise WillNotFit when the estimate exceeds what is free; `*_free` default to what the machine has."""
    device_free = available_device_memory(device) if device_free is None else device_free
    if device.type == "cpu":
        need_here, free_here, where = need.device_bytes + need.host_bytes, device_free, "RAM"
    else:
        need_here, free_here, where = need.device_bytes, device_free, f"free on {device}"
    problems = []
    if free_here is not None and need_here > free_here:
        problems.append(f"{_gb(need_here)} needed, {_gb(free_here)} {where}")
    if device.type != "cpu" and need.host_bytes:
        host_free = available_ram() if host_free is None else host_free
        if host_free is not None and need.host_bytes > host_free:
            problems.append(f"{_gb(need.host_bytes)} of offloaded weights, {_gb(host_free)} RAM available")
    if not problems:
        return
    weights = ", ".join(f"{name} {_gb(size)}" for name, size in need.components.items())
    raise WillNotFit(
        f"the model will not fit: {'; '.join(problems)} (weights as {str(dtype).removeprefix('torch.')}: "
        f"{weights}; plus working memory). Ways out: {_ways_out(device, dtype, quantize, offload)}"
    )


def _ways_out(device: torch.device, dtype: torch.dtype, quantize: str, offload: str) -> str:
    ways = []
    if device.type == "cpu":
        if dtype == torch.float32:
            ways.append("--dtype bfloat16 (halves it)")
        ways.append("a GPU (--device cuda)")
    else:
        if offload == "none":
            ways.append("--offload model (or group, sequential)")
        elif offload == "model":
            ways.append("--offload group (or sequential)")
    if quantize == "none":
        ways.append("--quantize fp8 or int8 (about half the transformer and T5), nf4 (about a quarter)")
    return "; ".join(ways) or "a machine with more memory"


def check_model_fits(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str = "none",
    offload: str = "none",
    device_free: int | None = None,
    host_free: int | None = None,
    transformer_file: str = "",
    text_encoder_file: str = "",
) -> MemoryEstimate | None:
    """Estimate what loading `source` needs and raise WillNotFit if it cannot fit; None if not estimable."""
    weights = count_weights(source, transformer_file, text_encoder_file)
    if weights is None:
        return None
    # On a CPU offloading moves nothing: every weight is in RAM either way.
    need = estimate(weights, dtype, quantize, offload if device.type != "cpu" else "none")
    if not weights.quantized_while_loading:
        quantize = "random"  # not a way out: random-full is built whole before it is quantized
    check_fits(need, device, dtype, quantize, offload, device_free=device_free, host_free=host_free)
    return need


def check_set_fits(
    models: list[tuple[str, str, str]],
    device: torch.device,
    dtype: torch.dtype,
    quantize: str = "none",
    device_free: int | None = None,
) -> tuple[MemoryEstimate, str] | None:
    """`check_model_fits` for several models served together: (the estimate, what sharing saves, in words);
    None where not estimable."""
    counted = count_model_set(models)
    if counted is None:
        return None
    need = estimate(counted.weights, dtype, quantize)
    check_fits(need, device, dtype, quantize, device_free=device_free)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    saved = counted.shared_elements * element_bytes + counted.shared_other_bytes
    return need, f"{len(models)} models; {counted.describe()}; {_gb(saved)} saved by sharing"


def count_flux_dev_with_file(file_format: str) -> Weights:
    """FLUX.1-dev's real shapes (meta device) with its transformer stored as `file_format` would store it
    (octoflux.pipelines.export's rule): what `--transformer` of that type loads beside a bf16 base."""
    from octoflux.pipelines.export import stored_bytes, stored_kind
    from octoflux.pipelines.random_full import build_components

    weights = Weights()
    for name, model in build_components("meta", torch.float32).items():
        for parameter in model.parameters():
            shape = tuple(parameter.shape)
            kind = stored_kind(shape, file_format) if name == "transformer" else "F32"
            if kind in GGUF_PLAIN_KINDS or (kind == "BF16" and not file_format.startswith("gguf:")):
                weights.add(name, parameter.numel())
            else:
                weights.add(name, 0, stored_bytes(shape, kind))
    return weights
