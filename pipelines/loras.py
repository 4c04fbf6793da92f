"""The LoRA library on disk and the adapters kept resident on the one pipeline.

`LoraLibrary` is the folder (`--lora-dir`): names, files, nothing else; any thread may use it.
`read_lora` opens one file safely (safetensors only, size limit, diffusers' key converters,
every tensor checked against this pipeline's linear layers) for both uploads and loading.
`LoraCache` is touched only by the worker thread: it loads files as PEFT adapters on the
resident pipeline, keeps the `cache_size` most recently used, and sets exactly the adapters a
request names before it runs (none at all when it names none).

Slot mode (`slots > 0`, used when the transformer is torch.compiled): the transformer carries a
fixed number of PEFT adapters ("slots"), created before compilation with diffusers'
`enable_lora_hotswap` at `max_rank` over every transformer linear a LoRA may target. A request's
LoRAs are hot-swapped into slots (`load_lora_into_transformer(..., hotswap=True)`: weights copied
in place, ranks zero-padded) and weighted by filling the slots' scaling tensors, so changing
LoRAs or weights never changes what the compiled graphs guard on. An unused slot has scaling 0,
which adds exactly zero: no LoRA gives the base output. CLIP is not compiled and keeps one PEFT
adapter per LoRA as without slots (diffusers cannot hot-swap text encoders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
SUFFIX = ".safetensors"
COMPONENTS = ("transformer", "text_encoder")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the PEFT config

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

LOAD_SECONDS = Histogram("octoflux_lora_load_seconds", "Time to read and attach one LoRA adapter")
SWITCH_SECONDS = Histogram("octoflux_lora_switch_seconds", "Time to change the active LoRA set")
EVICTIONS = Counter("octoflux_lora_evictions_total", "LoRA adapters removed from the pipeline")
CACHE_HITS = Counter("octoflux_lora_cache_hits", "LoRA activations served by a resident adapter")
CACHE_MISSES = Counter("octoflux_lora_cache_misses", "LoRA activations that loaded weights from disk")


class LoraError(Exception):
    """A LoRA named by a request or an upload cannot be used; `str()` says why and names it."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


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


class LoraLibrary:
    """The folder of `<name>.safetensors` files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{lora_name(name)}{SUFFIX}"

    def resolve(self, ref: str) -> Path:
        """The file for `ref`, or LoraNotFound naming it."""
        path = self.path(ref)
        if not path.is_file():
            raise LoraNotFound(ref, f"unknown LoRA {ref!r}: no {path.name} in the LoRA folder")
        return path

    def names(self) -> list[str]:
        stems = (p.name[: -len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}") if p.is_file())
        return sorted(s for s in stems if NAME_PATTERN.fullmatch(s))


# ---------------------------------------------------------------- reading and checking a file

ModuleShapes = dict[str, tuple[int, int]]


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


def _convert(tensors: dict[str, torch.Tensor], name: str) -> tuple[dict, dict]:
    """diffusers' own converters: kohya/sd-scripts, ComfyUI, XLabs, BFL, PEFT → PEFT layout."""
    from diffusers import FluxPipeline

    try:
        state, alphas = FluxPipeline.lora_state_dict(tensors, return_alphas=True)
    except Exception as exc:  # the converters raise ValueError, KeyError, AssertionError, ...
        raise LoraInvalid(
            name, f"not a FLUX LoRA in a known key layout (diffusers/PEFT, kohya, XLabs, BFL): {exc}"
        ) from None
    return state, dict(alphas or {})


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
    if component not in COMPONENTS:
        # diffusers' sd-scripts converter leaves a few transformer keys unprefixed (img_in, time_in, ...)
        component, rest = "transformer", module
    if component == "text_encoder" and f"text_encoder.{rest}" not in shapes:
        rest = rest.removeprefix("text_model.")  # CLIPTextModel lost that level in transformers 5
    return component, rest, factor


def _check_shapes(name: str, key: str, module: str, factor: str, shape: tuple, expected: tuple[int, int]):
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
        _check_shapes(name, key, full, factor, shape, shapes[full])
        if factor == "alpha":
            grouped_alphas[component][f"{module}.alpha"] = float(value)
            continue
        canonical = {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias"}[factor]
        tensors[component][f"{module}.{canonical}"] = value
        if factor in ("A", "B"):
            ranks.setdefault(full, {})[factor] = shape[0] if factor == "A" else shape[1]
    for module, factors in ranks.items():
        if set(factors) != {"A", "B"}:
            missing = "lora_B" if "A" in factors else "lora_A"
            raise LoraInvalid(name, f"{module} has no {missing} tensor")
        if factors["A"] != factors["B"]:
            raise LoraInvalid(name, f"{module}: lora_A has rank {factors['A']} but lora_B {factors['B']}")
    if not ranks:
        raise LoraInvalid(name, "the file holds no LoRA layers")
    return tensors, grouped_alphas, max(r["A"] for r in ranks.values())


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
    per_component = None
    if metadata is not None:
        per_component = {
            c: {k.removeprefix(f"{c}."): v for k, v in metadata.items() if k.startswith(f"{c}.")}
            for c in COMPONENTS
        }
    return LoraFile(name, sha256, size, tensors, grouped_alphas, per_component, rank)


# ---------------------------------------------------------------- attaching adapters


def _unfuse_qkv(transformer) -> None:
    """LoRAs target to_q/to_k/to_v; a fused to_qkv (--optimize compile) would silently bypass them."""
    if any(getattr(module, "fused_projections", False) for module in transformer.modules()):
        log.warning("unfusing QKV projections so LoRAs apply (costs the fused-QKV speed-up)")
        transformer.unfuse_qkv_projections()


def _attach_transformer(pipe, lora: LoraFile, adapter: str) -> None:
    _unfuse_qkv(pipe.transformer)
    state = {f"transformer.{k}": v for k, v in lora.tensors["transformer"].items()}
    alphas = {f"transformer.{k}": v for k, v in lora.alphas["transformer"].items()}
    metadata = (lora.metadata or {}).get("transformer") or None
    type(pipe).load_lora_into_transformer(
        state,
        network_alphas=None if metadata else alphas or None,
        transformer=pipe.transformer,
        adapter_name=adapter,
        metadata={f"transformer.{k}": v for k, v in metadata.items()} if metadata else None,
        _pipeline=pipe,
    )
    if adapter not in getattr(pipe.transformer, "peft_config", {}):
        raise RuntimeError("diffusers attached no layer from it")


def _attach_text_encoder(text_encoder, lora: LoraFile, adapter: str) -> None:
    """diffusers' text-encoder path, ending in PEFT's injector: transformers 5's own `load_adapter`
    refuses PEFT < 0.22, the newest release today is 0.21."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state = lora.tensors["text_encoder"]
    rank = {k: v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
    metadata = (lora.metadata or {}).get("text_encoder") or None
    alphas = None if metadata else lora.alphas["text_encoder"] or None
    config = _create_lora_config(state, alphas, metadata, rank, is_unet=False)
    with warnings.catch_warnings():  # "Already found a `peft_config`": several adapters is the point
        warnings.simplefilter("ignore", UserWarning)
        inject_adapter_in_model(config, text_encoder, adapter_name=adapter)
    result = set_peft_model_state_dict(text_encoder, state, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise RuntimeError(f"unexpected keys {unexpected[:3]}")


def _detach(pipe, adapter: str) -> None:
    """Remove an adapter's layers from every component that has them."""
    from diffusers.loaders.lora_base import delete_adapter_layers

    if adapter in getattr(pipe.transformer, "peft_config", {}):
        pipe.transformer.delete_adapters([adapter])
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is not None and adapter in getattr(text_encoder, "peft_config", {}):
        delete_adapter_layers(text_encoder, adapter)
        text_encoder.peft_config.pop(adapter, None)


def _activate_component(model, adapters: list[str], weights: list[float], is_text_encoder: bool) -> None:
    """Exactly `adapters` active on this model, or every LoRA layer bypassed when there are none."""
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
        set_adapters_for_text_encoder,
    )

    present = set(getattr(model, "peft_config", {}) or {})
    chosen = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in present]
    if is_text_encoder:
        if chosen:
            enable_lora_for_text_encoder(model)
            set_adapters_for_text_encoder([a for a, _ in chosen], model, [w for _, w in chosen])
        else:
            disable_lora_for_text_encoder(model)  # a no-op on a model with no LoRA layers
    elif chosen:
        model.enable_lora()
        model.set_adapters([a for a, _ in chosen], [w for _, w in chosen])
    elif getattr(model, "_hf_peft_config_loaded", False):
        # PEFT layers stay wrapped around the base layers but forward to them untouched.
        model.disable_lora()


@dataclass
class Adapter:
    name: str
    adapter: str  # PEFT adapter names may not contain "."; ours are made safe and unique
    fingerprint: tuple[int, int, int]
    sha256: str
    components: tuple[str, ...]
    rank: int
    lora: LoraFile | None = None  # slot mode: kept to hot-swap into a slot again without the disk


def _transformer_state(lora: LoraFile) -> tuple[dict, dict | None, dict | None]:
    """State dict, network alphas and metadata of the transformer part, prefixed as diffusers wants."""
    state = {f"transformer.{k}": v for k, v in lora.tensors["transformer"].items()}
    alphas = {f"transformer.{k}": v for k, v in lora.alphas["transformer"].items()}
    metadata = (lora.metadata or {}).get("transformer") or None
    if metadata:
        return state, None, {f"transformer.{k}": v for k, v in metadata.items()}
    return state, alphas or None, None


class LoraSlots:
    """A fixed set of hot-swappable adapters on the transformer; created before torch.compile."""

    def __init__(self, pipe, shapes: ModuleShapes, count: int, max_rank: int):
        from peft.tuners.lora import LoraLayer

        if any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules()):
            raise RuntimeError("create LoRA slots before fusing QKV projections (they target to_q/to_k/to_v)")
        self.pipe = pipe
        self.max_rank = max_rank
        self.names = [f"slot{i}" for i in range(count)]
        self.content: list[Adapter | None] = [None] * count  # which LoRA's weights sit in each slot
        self.weights: list[float] = [0.0] * count
        self._base: list[list[float]] = [[] for _ in range(count)]  # per-layer alpha/rank of the content
        transformer = pipe.transformer
        param = next(transformer.parameters())
        # Zero factors at max_rank on every linear a LoRA may target: any valid LoRA swaps in.
        seed = {}
        for full, (in_features, out_features) in shapes.items():
            component, _, module = full.partition(".")
            if component == "transformer":
                seed[f"transformer.{module}.lora_A.weight"] = torch.zeros(
                    max_rank, in_features, dtype=param.dtype, device=param.device
                )
                seed[f"transformer.{module}.lora_B.weight"] = torch.zeros(
                    out_features, max_rank, dtype=param.dtype, device=param.device
                )
        for name in self.names:
            # diffusers runs PEFT's prepare_model_for_compiled_hotswap (scalings become tensors, ranks
            # are padded) on the next load only: arm it again for every slot.
            transformer.enable_lora_hotswap(target_rank=max_rank, check_compiled="ignore")
            with warnings.catch_warnings():  # "Already found a `peft_config`": several slots is the point
                warnings.simplefilter("ignore", UserWarning)
                type(pipe).load_lora_into_transformer(
                    dict(seed),
                    network_alphas=None,
                    transformer=transformer,
                    adapter_name=name,
                    _pipeline=pipe,
                )
        transformer.set_adapter(self.names)  # all slots always active; weights live in the scalings
        self.layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
        for layer in self.layers:
            for name in self.names:
                if not torch.is_tensor(layer.scaling.get(name)):
                    raise RuntimeError(f"slot {name} scaling was not made a tensor by enable_lora_hotswap")
                layer.scaling[name].fill_(0.0)

    def check(self, lora: LoraFile) -> None:
        if lora.rank > self.max_rank:
            raise LoraInvalid(
                lora.name,
                f"LoRA {lora.name!r} has rank {lora.rank}; this server hot-swaps LoRAs of rank up to "
                f"{self.max_rank} (--lora-max-rank)",
            )

    def assign(self, chosen: list[tuple[Adapter, float]]) -> None:
        """Put these LoRAs' transformer weights in slots (reusing slots that already hold them), weight
        them, and weight every other slot 0."""
        wanted: dict[int, float] = {}
        pending = []
        for entry, weight in chosen:
            held = next((i for i, c in enumerate(self.content) if c is entry and i not in wanted), None)
            if held is None:
                pending.append((entry, weight))
            else:
                wanted[held] = weight
        free = [i for i in range(len(self.names)) if i not in wanted]
        for (entry, weight), i in zip(pending, free, strict=False):
            self._swap(i, entry)
            wanted[i] = weight
        for i in range(len(self.names)):
            self._weigh(i, wanted.get(i, 0.0))

    def forget(self, entry: Adapter) -> None:
        for i, content in enumerate(self.content):
            if content is entry:
                self.content[i] = None

    def _swap(self, i: int, entry: Adapter) -> None:
        name = self.names[i]
        self.content[i] = None
        self.weights[i] = float("nan")  # the swap rewrote the scalings: weigh again
        state, alphas, metadata = _transformer_state(entry.lora)
        if metadata:
            metadata = {**metadata, "transformer.lora_dropout": 0.0}  # inference: dropout is a no-op
        try:
            type(self.pipe).load_lora_into_transformer(
                state,
                network_alphas=alphas,
                transformer=self.pipe.transformer,
                adapter_name=name,
                metadata=metadata,
                _pipeline=self.pipe,
                hotswap=True,
            )
        except Exception as exc:
            for layer in self.layers:  # whatever half-swapped weights remain must not apply
                layer.scaling[name].fill_(0.0)
            self.weights[i] = 0.0
            raise LoraInvalid(entry.name, f"LoRA {entry.name!r} cannot be hot-swapped: {exc}") from exc
        # The swap set each layer's scaling to the new LoRA's alpha/rank; the request weight multiplies it.
        self._base[i] = torch.stack([layer.scaling[name] for layer in self.layers]).tolist()
        self.content[i] = entry

    def _weigh(self, i: int, weight: float) -> None:
        if self.weights[i] == weight:
            return
        name = self.names[i]
        base = self._base[i] if self.content[i] is not None else [0.0] * len(self.layers)
        for layer, scale in zip(self.layers, base, strict=True):
            layer.scaling[name].fill_(weight * scale)  # in place: a new value is no new graph
        self.weights[i] = weight


@dataclass
class LoraStats:
    """Counts and times of what the cache did; exposed by metrics, read by tests and benchmarks."""

    loads: int = 0
    load_seconds: float = 0.0
    switches: int = 0
    switch_seconds: float = 0.0
    evictions: int = 0
    reloads: int = 0
    last_load_seconds: float = 0.0
    last_switch_seconds: float = 0.0
    events: list[str] = field(default_factory=list)  # the last few, newest last

    def note(self, event: str) -> None:
        self.events = [*self.events[-49:], event]


def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class LoraCache:
    """Adapters resident on the pipeline, least recently used evicted; worker thread only."""

    def __init__(
        self,
        pipe,
        library: LoraLibrary,
        cache_size: int = 8,
        max_bytes: int = 2048 * 2**20,
        slots: int = 0,
        max_rank: int = 64,
    ):
        self.pipe = pipe
        self.library = library
        self.cache_size = max(1, cache_size)
        self.max_bytes = max_bytes
        # Taken before any adapter wraps a layer; immutable, so any thread may validate with it.
        self.shapes: ModuleShapes = linear_shapes(pipe)
        self.stats = LoraStats()
        self._resident: OrderedDict[str, Adapter] = OrderedDict()
        # None: unknown (after a load, eviction or failure PEFT may have changed it): set it afresh.
        self._active: tuple[tuple[str, float], ...] | None = None
        self._counter = 0
        # Slot mode (for a compiled transformer): create before compiling, see the module docstring.
        self.slots = LoraSlots(pipe, self.shapes, slots, max_rank) if slots > 0 else None

    @property
    def resident(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        return list(self._resident)

    @property
    def text_encoder_key(self) -> tuple:
        """What the active LoRAs do to prompt embeddings; part of any prompt-embedding cache key."""
        return tuple(
            (self._resident[n].sha256, w)
            for n, w in self._active or ()
            if "text_encoder" in self._resident[n].components
        )

    def activate(self, loras: dict[str, float]) -> None:
        """Load what is missing or changed on disk, then make exactly these adapters active."""
        wanted: dict[str, float] = {}
        for ref, weight in loras.items():
            name = lora_name(ref)
            wanted[name] = wanted.get(name, 0.0) + weight
        if self.slots is not None and len(wanted) > len(self.slots.names):
            raise LoraInvalid(
                ",".join(wanted),
                f"{len(wanted)} LoRAs requested; this server applies at most {len(self.slots.names)} "
                "per request (--lora-slots, with a compiled transformer)",
            )
        for name in wanted:
            self._ensure(name)
        self._evict_beyond_capacity(keep=set(wanted))
        target = tuple(sorted(wanted.items()))
        if target == self._active:
            return
        started = time.perf_counter()
        adapters = [self._resident[n].adapter for n, _ in target]
        weights = [w for _, w in target]
        self._set_active(adapters, weights)
        self._active = target
        seconds = time.perf_counter() - started
        self.stats.switches += 1
        self.stats.switch_seconds += seconds
        self.stats.last_switch_seconds = seconds
        self.stats.note(f"switch {[n for n, _ in target]}")
        SWITCH_SECONDS.observe(seconds)
        log.info("LoRA set %s active in %.1f ms", dict(target) or "{}", seconds * 1000)

    def _set_active(self, adapters: list[str], weights: list[float]) -> None:
        if self.slots is None:
            _activate_component(self.pipe.transformer, adapters, weights, is_text_encoder=False)
        else:
            by_adapter = {e.adapter: e for e in self._resident.values()}
            chosen = [(by_adapter[a], w) for a, w in zip(adapters, weights, strict=True)]
            try:
                self.slots.assign([(e, w) for e, w in chosen if "transformer" in e.components])
            except LoraError:
                self._active = None
                raise
        text_encoder = getattr(self.pipe, "text_encoder", None)
        if text_encoder is not None:
            _activate_component(text_encoder, adapters, weights, is_text_encoder=True)

    def _ensure(self, name: str) -> Adapter:
        path = self.library.path(name)
        try:
            fingerprint = _fingerprint(path)
        except FileNotFoundError:
            raise LoraNotFound(name, f"unknown LoRA {name!r}: no {path.name} in the LoRA folder") from None
        entry = self._resident.get(name)
        if entry is not None:
            if entry.fingerprint == fingerprint:
                self._resident.move_to_end(name)
                CACHE_HITS.inc()
                return entry
            if file_sha256(path) == entry.sha256:  # touched, not changed
                entry.fingerprint = fingerprint
                self._resident.move_to_end(name)
                CACHE_HITS.inc()
                return entry
            self._evict(name, why="its file changed")
            self.stats.reloads += 1
        CACHE_MISSES.inc()
        return self._load(name, path, fingerprint)

    def _load(self, name: str, path: Path, fingerprint: tuple[int, int, int]) -> Adapter:
        started = time.perf_counter()
        try:
            lora = read_lora(path, name, self.shapes, self.max_bytes)
        except FileNotFoundError:  # deleted between the request's check and now
            raise LoraNotFound(name, f"unknown LoRA {name!r}: {path.name} was removed") from None
        if self.slots is not None:
            self.slots.check(lora)
        self._counter += 1
        adapter = f"{re.sub(r'[^A-Za-z0-9_]', '_', name)[:48]}__{self._counter}"
        try:
            if "transformer" in lora.components and self.slots is None:
                _attach_transformer(self.pipe, lora, adapter)
            if "text_encoder" in lora.components:
                _attach_text_encoder(self.pipe.text_encoder, lora, adapter)
        except Exception as exc:
            _detach(self.pipe, adapter)
            self._active = None
            raise LoraInvalid(name, f"LoRA {name!r} could not be attached to the pipeline: {exc}") from exc
        entry = Adapter(name, adapter, fingerprint, lora.sha256, lora.components, lora.rank)
        if self.slots is not None:
            entry.lora = lora
        self._resident[name] = entry
        self._active = None
        seconds = time.perf_counter() - started
        self.stats.loads += 1
        self.stats.load_seconds += seconds
        self.stats.last_load_seconds = seconds
        self.stats.note(f"load {name}")
        LOAD_SECONDS.observe(seconds)
        log.info(
            "loaded LoRA %r (rank %d, %s, %.2f MB) in %.1f ms",
            name,
            lora.rank,
            "+".join(lora.components),
            lora.size / 2**20,
            seconds * 1000,
        )
        return entry

    def _evict_beyond_capacity(self, keep: set[str]) -> None:
        for name in list(self._resident):
            if len(self._resident) <= self.cache_size:
                break
            if name not in keep:
                self._evict(name, why="least recently used")

    def _evict(self, name: str, why: str) -> None:
        entry = self._resident.pop(name)
        _detach(self.pipe, entry.adapter)
        if self.slots is not None:
            self.slots.forget(entry)
        self._active = None  # PEFT re-activates a survivor when the active adapter is deleted
        self.stats.evictions += 1
        self.stats.note(f"evict {name}")
        EVICTIONS.inc()
        log.info("evicted LoRA %r (%s)", name, why)
