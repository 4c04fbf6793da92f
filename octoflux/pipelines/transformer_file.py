"""What a `--transformer FILE` holds, read from its header only: format, key layout, tensor shapes and
stored types, the FLUX.1 family, and whether it fits the base model's transformer config.

Formats: GGUF (city96's files; every type diffusers dequantizes) and .safetensors (bf16, fp16, fp32 or
fp8 e4m3fn weights), in BFL's original layout, ComfyUI's (BFL under `model.diffusion_model.`) or
diffusers'. Every problem is a `TransformerFileError` whose message is one line naming the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from octoflux.pipelines.bfl_layout import COMFY_PREFIX
from octoflux.pipelines.loader import ModelLoadError

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
FP8_KINDS = {"F8_E4M3", "F8_E5M2"}
# A key only FLUX.1 transformers have, in each layout.
BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.add_q_proj.weight"
# Families the tensors (or, for Kontext, the file's metadata or name) say a file is.
SERVED_FAMILIES = ("flux-dev", "flux-schnell", "flux-kontext-dev", "flux-fill-dev")
FAMILY_TITLES = {
    "flux-dev": "FLUX.1-dev",
    "flux-schnell": "FLUX.1-schnell",
    "flux-kontext-dev": "FLUX.1 Kontext",
    "flux-fill-dev": "FLUX.1 Fill",
    "flux-depth": "FLUX.1 Depth/Canny",
}


class TransformerFileError(ModelLoadError):
    """A `--transformer` file that cannot be served; the message is one line naming it."""


@dataclass(frozen=True)
class StoredTensor:
    shape: tuple[int, ...]  # the logical shape (for GGUF, the dequantized one)
    kind: str  # how it is stored: "BF16", "F8_E4M3", "Q8_0", "Q4_K", ...
    nbytes: int

    @property
    def elements(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass
class TransformerFile:
    path: Path
    format: str  # "gguf" or "safetensors"
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        if any(key.startswith(COMFY_PREFIX) for key in self.tensors):
            return "comfy"
        return "bfl" if BFL_MARKER in self.tensors else "diffusers"

    @property
    def total_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors.values())

    @property
    def kinds(self) -> dict[str, int]:
        """Stored bytes per tensor type, for logs: {"Q8_0": ..., "F32": ...}."""
        totals: dict[str, int] = {}
        for tensor in self.tensors.values():
            totals[tensor.kind] = totals.get(tensor.kind, 0) + tensor.nbytes
        return totals

    @property
    def is_fp8(self) -> bool:
        return self.format == "safetensors" and any(t.kind in FP8_KINDS for t in self.tensors.values())

    def bfl_key(self, name: str) -> StoredTensor | None:
        return self.tensors.get(name) or self.tensors.get(COMFY_PREFIX + name)

    def error(self, what: str) -> TransformerFileError:
        return TransformerFileError(f"--transformer {self.path}: {what}")


def inspect_transformer_file(path: str | Path) -> TransformerFile:
    """Read a transformer file's header (no weights) and check it is a FLUX.1 transformer."""
    path = Path(path).expanduser()
    file_format, tensors, metadata = read_weight_file(
        path, lambda what: TransformerFileError(f"--transformer {path}: {what}")
    )
    found = TransformerFile(path, file_format, tensors, metadata)
    _check_is_flux1(found)
    return found


def read_weight_file(
    path: Path, fail: Callable[[str], ModelLoadError]
) -> tuple[str, dict[str, StoredTensor], dict[str, str]]:
    """(format, tensors, metadata) from a .gguf or .safetensors header; `fail(what)` makes the error."""
    if not path.is_file():
        raise fail("no such file")
    if path.suffix == ".gguf":
        return "gguf", *_read_gguf(path, fail)
    if path.suffix == ".safetensors":
        return "safetensors", *_read_safetensors(path, fail)
    raise fail("not a .gguf or .safetensors file")


def _read_safetensors(
    path: Path, fail: Callable[[str], ModelLoadError]
) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError("its header runs past the end of the file")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise fail(f"not a readable safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, entry in header.items():
        begin, stop = entry["data_offsets"]
        end = max(end, stop)
        tensors[name] = StoredTensor(tuple(entry["shape"]), entry["dtype"], stop - begin)
    if 8 + length + end > size:
        raise fail(f"truncated ({size} bytes; its header describes {8 + length + end})")
    return tensors, metadata


def _read_gguf(
    path: Path, fail: Callable[[str], ModelLoadError]
) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on a bad file
        size = path.stat().st_size
        raise fail(
            f"not a readable GGUF file ({size} bytes; truncated or damaged: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None
    tensors = {
        tensor.name: StoredTensor(
            tuple(int(n) for n in reversed(tensor.shape)), tensor.tensor_type.name, int(tensor.n_bytes)
        )
        for tensor in reader.tensors
    }
    metadata = {}
    architecture = reader.get_field("general.architecture")
    if architecture is not None:
        metadata["general.architecture"] = str(architecture.contents())
    return tensors, metadata


def _check_is_flux1(found: TransformerFile) -> None:
    architecture = found.metadata.get("general.architecture", "flux")
    if architecture != "flux":
        raise found.error(f"a GGUF of architecture {architecture!r}, not a FLUX.1 transformer")
    if found.bfl_key(BFL_MARKER) is None and DIFFUSERS_MARKER not in found.tensors:
        some = ", ".join(sorted(found.tensors)[:3]) or "no tensors"
        raise found.error(f"not a FLUX.1 transformer (no {BFL_MARKER}; it holds {some}, ...)")
    if found.format == "gguf":
        from octoflux.pipelines.compat import gguf_supported_type_names

        supported = gguf_supported_type_names()
        unsupported = sorted({t.kind for t in found.tensors.values()} - set(supported))
        if unsupported:
            raise found.error(
                f"GGUF types {', '.join(unsupported)} cannot be read (diffusers reads {', '.join(supported)})"
            )


def detect_family(found: TransformerFile) -> str:
    """flux-dev, -schnell, -fill, -depth from the tensors; Kontext (same tensors as dev) from the
    file's metadata or name."""
    bfl = found.layout != "diffusers"
    image_in = found.bfl_key("img_in.weight") if bfl else found.tensors.get("x_embedder.weight")
    image_out = found.bfl_key("final_layer.linear.weight") if bfl else found.tensors.get("proj_out.weight")
    if image_in and image_out and image_in.shape[1] == 6 * image_out.shape[0]:
        return "flux-fill-dev"  # latents + masked-image latents + the 8x8-packed mask
    if image_in and image_out and image_in.shape[1] == 2 * image_out.shape[0]:
        return "flux-depth"  # latents + control-image latents
    described = " ".join([found.path.name, *found.metadata.values()]).lower()
    if "kontext" in described:
        return "flux-kontext-dev"
    guided = found.bfl_key("guidance_in.in_layer.weight") if bfl else None
    guided = guided or found.tensors.get("time_text_embed.guidance_embedder.linear_1.weight")
    return "flux-dev" if guided else "flux-schnell"


def check_served(found: TransformerFile) -> str:
    """The family, if this server can serve it; a one-line refusal otherwise."""
    family = detect_family(found)
    if family not in SERVED_FAMILIES:
        raise found.error(
            f"a {FAMILY_TITLES[family]} transformer: not served yet (FLUX.1-dev, -schnell, Kontext, Fill are)"
        )
    return family


def diffusers_shapes(found: TransformerFile, config: dict) -> dict[str, tuple[int, ...]]:
    """The file's tensor shapes under diffusers' names (diffusers' own converter, on meta tensors)."""
    from octoflux.pipelines.compat import flux_transformer_to_diffusers

    meta = {name: torch.empty(t.shape, device="meta") for name, t in found.tensors.items()}
    if found.layout == "diffusers":
        return {name: tuple(t.shape) for name, t in meta.items()}
    try:
        converted = flux_transformer_to_diffusers(meta, config)
    except (KeyError, RuntimeError, IndexError) as exc:
        raise found.error(
            f"its {found.layout} tensors do not convert to diffusers' names (missing {exc})"
        ) from None
    return {name: tuple(tensor.shape) for name, tensor in converted.items()}


def check_matches_base(found: TransformerFile, config: dict, base: str) -> None:
    """Every tensor of the base config's transformer, of the same shape, and nothing else."""
    from diffusers import FluxTransformer2DModel

    from octoflux.pipelines.family import family_from_transformer_config
    from octoflux.pipelines.loader import pipeline_class_name

    file_family = detect_family(found)
    base_family = family_from_transformer_config(config, pipeline_class_name(base))
    # Kontext has dev's tensors: a file not named Kontext is taken for one on a Kontext base.
    same = file_family == base_family or (file_family, base_family) == ("flux-dev", "flux-kontext-dev")
    if file_family in SERVED_FAMILIES and not same:
        raise found.error(
            f"a {FAMILY_TITLES[file_family]} transformer, but --model {base} is "
            f"{FAMILY_TITLES[base_family]}'s config; use a base of the same family"
        )
    with torch.device("meta"):
        expected = {
            n: tuple(t.shape) for n, t in FluxTransformer2DModel.from_config(config).state_dict().items()
        }
    wrong = shape_mismatches(expected, diffusers_shapes(found, config))
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise found.error(f"does not match --model {base}'s transformer config: {wrong[0]}{more}")


def shape_mismatches(
    expected: dict[str, tuple[int, ...]],
    shapes: dict[str, tuple[int, ...]],
    stored_names: dict[str, str] | None = None,
) -> list[str]:
    """What differs between the base's tensors and a file's, in words (`stored_names`: the file's names)."""
    stored = stored_names or {}
    wrong = [
        f"{n} is {_dims(shapes[n])} in the file, {_dims(s)} in the base"
        for n, s in expected.items()
        if n in shapes and shapes[n] != s
    ]
    wrong += [f"{n} is missing" for n in expected if n not in shapes]
    wrong += [f"{stored.get(n, n)} is not in the base" for n in shapes if n not in expected]
    return wrong


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape) or "a scalar"
