"""The LoRA folder and one LoRA file: names, safety checks, key layouts, shapes.

Nothing here touches the pipeline's weights; any thread may call it (uploads validate with it).
`read_lora` converts every layout diffusers' `FluxPipeline.load_lora_weights` reads (diffusers/PEFT,
ai-toolkit, kohya/sd-scripts and ComfyUI with or without CLIP `lora_te1_*` keys, XLabs, BFL) with
diffusers' own converters, keeps what that loader would load (it leaves some converted keys out),
then checks every tensor against the pipeline's linear layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from octoflux.pipelines.errors import LoraError

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
SPACE_PATTERN = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".safetensors"
# Files one API key owns: `<folder>/.tenants/<space>/<name>.safetensors`, its key `<space>/<name>`.
TENANTS = ".tenants"
COMPONENTS = ("transformer", "text_encoder")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the PEFT config
LAYOUTS = "diffusers/PEFT, kohya/sd-scripts, ComfyUI, XLabs, BFL"

# The key endings diffusers' converters leave behind, mapped to which LoRA factor they are.
FACTOR_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
    (".lora_linear_layer.down.weight", "A"),
    (".lora_linear_layer.up.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
)
CANONICAL = {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias"}
# CLIP keys in diffusers' pre-PEFT form: its text-encoder loader renames them only when it guesses
# that form for the whole dict (a `to_out_lora` key is what it looks for), and skips them otherwise.
OLD_CLIP_FORM = re.compile(r"\.to_(q|k|v|out)_lora\.")
FACTOR_TAIL = re.compile(
    r"(\.lora_[AB]\.|\.lora_(down|up)\.|_lora\.|\.lora\.|\.lora_linear_layer\.|\.alpha$).*$"
)

log = logging.getLogger(__name__)

ModuleShapes = dict[str, tuple[int, int]]


class LoraNotFound(LoraError):
    """No file of that name in the LoRA folder."""


class LoraInvalid(LoraError):
    """The name or the file is unusable: bad name, not safetensors, too big, wrong keys or shapes."""


def lora_name(ref: str) -> str:
    """`name` or OctoAI's `owner:name` (the owner is ignored) → the file's stem."""
    name = ref.rpartition(":")[2]
    if not NAME_PATTERN.fullmatch(name):
        raise LoraInvalid(ref, f"LoRA name {ref!r} must be 1-128 characters from A-Z a-z 0-9 . _ -")
    return name


def lora_key(ref: str) -> str:
    """The cache's key for a LoRA: a shared file's name, or `<space>/<name>` for one an API key owns."""
    space, slash, name = ref.rpartition("/")
    if not slash:
        return lora_name(ref)
    if not SPACE_PATTERN.fullmatch(space):
        raise LoraInvalid(ref, f"LoRA name {ref!r} must be 1-128 characters from A-Z a-z 0-9 . _ -")
    return f"{space}/{lora_name(name)}"


def shown_name(key: str) -> str:
    """A LoRA key as its owner named it (without the space), for messages."""
    return key.rpartition("/")[2]


def not_found(ref: str, path: Path) -> LoraNotFound:
    return LoraNotFound(ref, f"unknown LoRA {ref!r}: no {path.name} in the LoRA folder")


class LoraLibrary:
    """The folder of `<name>.safetensors` files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of a shared name or of an owned `<space>/<name>` key (see `lora_key`)."""
        space, _, name = lora_key(key).rpartition("/")
        folder = self.directory / TENANTS / space if space else self.directory
        return folder / f"{name}{SUFFIX}"

    def resolve(self, ref: str) -> Path:
        """The file for `ref`, or LoraNotFound naming it."""
        path = self.path(ref)
        if not path.is_file():
            raise not_found(ref, path)
        return path

    def resolve_key(self, ref: str, space: str | None = None) -> str:
        """The key `ref` names for a caller whose own LoRAs are in `space`: its own file first, then
        the shared one of that name; LoraNotFound naming `ref` if neither exists."""
        name = lora_name(ref)
        if space is not None and self.path(f"{space}/{name}").is_file():
            return f"{space}/{name}"
        path = self.path(name)
        if not path.is_file():
            raise not_found(ref, path)
        return name

    def names(self) -> list[str]:
        stems = (p.name[: -len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}") if p.is_file())
        return sorted(s for s in stems if NAME_PATTERN.fullmatch(s))


def linear_shapes(pipe) -> ModuleShapes:
    """`{"transformer.<module>": (in_features, out_features)}` for every layer a LoRA may target."""
    shapes: ModuleShapes = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
                name = name.replace(".base_layer", "")  # already wrapped by PEFT
                shapes[f"{component}.{name}"] = (module.in_features, module.out_features)
    return shapes


@dataclass
class LoraFile:
    """A checked LoRA, converted to diffusers' PEFT layout, split per pipeline component."""

    name: str
    sha256: str
    size: int
    tensors: dict[str, dict[str, torch.Tensor]]  # component → {key without component prefix}
    alphas: dict[str, dict[str, float]]
    metadata: dict[str, dict] | None
    rank: int

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if self.tensors.get(c))

    def prefixed(self, component: str) -> tuple[dict, dict | None, dict | None]:
        """State dict, network alphas and PEFT metadata of one component, keys prefixed with its
        name as diffusers' loaders want them; alphas and metadata are exclusive (metadata wins)."""
        state = {f"{component}.{k}": v for k, v in self.tensors[component].items()}
        metadata = (self.metadata or {}).get(component)
        if metadata:
            return state, None, {f"{component}.{k}": v for k, v in metadata.items()}
        alphas = {f"{component}.{k}": v for k, v in self.alphas[component].items()}
        return state, alphas or None, None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(path: Path, name: str) -> dict | None:
    """Parse the safetensors header (never unpickles); returns diffusers' adapter metadata if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
            dtypes = {fh.get_slice(k).get_dtype() for k in keys}
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for any malformed header
        reason = f"not a safetensors file (only .safetensors LoRAs are accepted): {exc}"
        raise LoraInvalid(name, reason) from None
    if not keys:
        raise LoraInvalid(name, "the file holds no tensors")
    if not dtypes <= FLOAT_DTYPES:
        raise LoraInvalid(name, f"tensor dtypes {sorted(dtypes - FLOAT_DTYPES)} are not floating point")
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise LoraInvalid(name, f"the {METADATA_KEY!r} header entry is not JSON") from None
    if not isinstance(parsed, dict):
        raise LoraInvalid(name, f"the {METADATA_KEY!r} header entry is not a JSON object")
    return parsed


def _reason(exc: Exception) -> str:
    """A converter's exception in words: several raise a bare AssertionError with no message."""
    text = str(exc).strip()
    if text:
        return text if len(text) <= 300 else text[:300] + "..."
    return (
        f"diffusers' key converter rejected its keys or shapes ({type(exc).__name__} without a message), "
        "so FluxPipeline.load_lora_weights would refuse it too"
    )


def _convert(tensors: dict[str, torch.Tensor], name: str) -> tuple[dict, dict]:
    """diffusers' own converters: every layout `load_lora_weights` reads → PEFT layout, less the
    keys that loader leaves out."""
    from octoflux.pipelines import compat

    try:
        state, alphas = compat.flux_lora_state_dict(tensors)
    except Exception as exc:  # the converters raise ValueError, KeyError, AssertionError, ...
        reason = f"not a FLUX LoRA in a known key layout ({LAYOUTS}): {_reason(exc)}"
        raise LoraInvalid(name, reason) from None
    state, alphas, left_out = _as_loaded(state, alphas, name)
    if left_out and not state:
        raise LoraInvalid(
            name,
            f"no tensor in it is one FluxPipeline.load_lora_weights would load (after diffusers' "
            f"converters none is under 'transformer.' or 'text_encoder.', e.g. {left_out[0]!r}), "
            "so load_lora_weights would attach nothing",
        )
    if left_out:
        modules = list(dict.fromkeys(FACTOR_TAIL.sub("", k) for k in left_out))
        log.warning(
            "LoRA %r: FluxPipeline.load_lora_weights leaves out its layers on %d modules after "
            "diffusers' converters, and so does this server: %s",
            name,
            len(modules),
            ", ".join(modules[:8]) + (", ..." if len(modules) > 8 else ""),
        )
    return state, alphas


def _as_loaded(state: dict, alphas: dict, name: str) -> tuple[dict, dict, list[str]]:
    """The converted keys as `load_lora_weights` hands them on (CLIP renamed to PEFT keys), and the
    keys it leaves out."""

    def loaded(key: str) -> bool:
        # Each component gets only the keys under its name; the sd-scripts converter leaves
        # img_in, txt_in, time_in, ... without the `transformer.` prefix.
        return key.partition(".")[0] in COMPONENTS and not OLD_CLIP_FORM.search(key)

    clip = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
    if clip:
        state = {**{k: v for k, v in state.items() if k not in clip}, **_clip_to_peft(clip, name)}
    left_out = [k for k in [*state, *alphas] if not loaded(k)]
    state = {k: v for k, v in state.items() if loaded(k)}
    alphas = {k: v for k, v in alphas.items() if loaded(k)}
    return state, alphas, left_out


def _clip_to_peft(clip: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """kohya's CLIP keys (`lora_te1_*`) come out of the converter in diffusers' pre-PEFT text-encoder
    forms (`self_attn.to_k_lora.down`, `mlp.fc1.lora_linear_layer.down`); renamed as diffusers'
    text-encoder loader renames them."""
    from octoflux.pipelines import compat

    try:
        return compat.text_encoder_keys_to_peft(clip)
    except ValueError as exc:  # it guesses one form for the whole dict and may find none
        raise LoraInvalid(
            name,
            f"diffusers' text-encoder loader cannot tell the form of its CLIP tensors (such as "
            f"{next(iter(clip))!r}): {_reason(exc)}; so FluxPipeline.load_lora_weights would refuse it too",
        ) from None


def _split_key(key: str, shapes: ModuleShapes) -> tuple[str, str, str] | None:
    """`transformer.a.b.lora_A.weight` → ("transformer", "a.b", "A"); None when it is no LoRA factor."""
    for suffix, kind in FACTOR_SUFFIXES:
        if key.endswith(suffix):
            module, factor = key[: -len(suffix)], kind
            break
    else:
        if not key.endswith(".alpha"):
            return None
        module, factor = key[: -len(".alpha")], "alpha"
    component, _, rest = module.partition(".")
    if component == "text_encoder" and f"text_encoder.{rest}" not in shapes:
        rest = rest.removeprefix("text_model.")  # CLIPTextModel lost that level in transformers 5
    return component, rest, factor


def _check_shape(name: str, key: str, module: str, factor: str, shape: tuple, expected: tuple[int, int]):
    in_features, out_features = expected
    ok = {
        "A": len(shape) == 2 and shape[1] == in_features and shape[0] > 0,
        "B": len(shape) == 2 and shape[0] == out_features and shape[1] > 0,
        "bias": len(shape) == 1 and shape[0] == out_features,
        "alpha": len(shape) == 0 or shape == (1,),
    }[factor]
    if not ok:
        raise LoraInvalid(
            name,
            f"tensor {key!r} has shape {list(shape)}, which does not fit {module} "
            f"({in_features} inputs, {out_features} outputs)",
        )


def _check_ranks(name: str, ranks: dict[str, dict[str, int]]) -> int:
    """Every module has both factors of one rank; returns the largest rank."""
    if not ranks:
        raise LoraInvalid(name, "the file holds no LoRA layers")
    for module, factors in ranks.items():
        if set(factors) != {"A", "B"}:
            missing = "lora_B" if "A" in factors else "lora_A"
            raise LoraInvalid(name, f"{module} has no {missing} tensor")
        if factors["A"] != factors["B"]:
            raise LoraInvalid(name, f"{module}: lora_A has rank {factors['A']} but lora_B {factors['B']}")
    return max(r["A"] for r in ranks.values())


def _organise(name: str, state: dict, alphas: dict, shapes: ModuleShapes) -> tuple[dict, dict, int]:
    """Check every tensor against the pipeline's layers; group them per component."""
    tensors: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    grouped_alphas: dict[str, dict[str, float]] = {c: {} for c in COMPONENTS}
    ranks: dict[str, dict[str, int]] = {}
    for key, value in [*state.items(), *alphas.items()]:
        parts = _split_key(key, shapes)
        if parts is None:
            reason = f"tensor {key!r} is not a LoRA weight (lora_A/lora_B or lora_down/lora_up)"
            raise LoraInvalid(name, reason)
        component, module, factor = parts
        full = f"{component}.{module}"
        if full not in shapes:
            reason = f"tensor {key!r} does not map onto any linear layer of this FLUX pipeline"
            raise LoraInvalid(name, reason)
        shape = tuple(value.shape) if torch.is_tensor(value) else ()
        _check_shape(name, key, full, factor, shape, shapes[full])
        if factor == "alpha":
            grouped_alphas[component][f"{module}.alpha"] = float(value)
            continue
        tensors[component][f"{module}.{CANONICAL[factor]}"] = value
        if factor in ("A", "B"):
            ranks.setdefault(full, {})[factor] = shape[0] if factor == "A" else shape[1]
    return tensors, grouped_alphas, _check_ranks(name, ranks)


def _per_component(metadata: dict | None) -> dict[str, dict] | None:
    if metadata is None:
        return None
    return {
        c: {k.removeprefix(f"{c}."): v for k, v in metadata.items() if k.startswith(f"{c}.")}
        for c in COMPONENTS
    }


def read_lora(path: Path, name: str, shapes: ModuleShapes, max_bytes: int) -> LoraFile:
    """Open, convert and check one LoRA file; LoraInvalid says what is wrong with it."""
    from safetensors.torch import load_file

    if path.suffix != SUFFIX:
        raise LoraInvalid(name, f"only {SUFFIX} files are accepted")
    size = path.stat().st_size
    if size > max_bytes:
        raise LoraInvalid(name, f"the file is {size / 2**20:.2f} MB; the limit is {max_bytes / 2**20:.4g} MB")
    metadata = _read_header(path, name)
    sha256 = file_sha256(path)
    state, alphas = _convert(load_file(str(path), device="cpu"), name)
    tensors, grouped_alphas, rank = _organise(name, state, alphas, shapes)
    return LoraFile(name, sha256, size, tensors, grouped_alphas, _per_component(metadata), rank)
