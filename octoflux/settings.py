"""Every knob of the server, once: a CLI flag and an OCTOFLUX_* environment variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from octoflux.webhooks.signing import check_webhook_secret


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024x1024, 512x512' -> [(1024, 1024), (512, 512)]."""
    sizes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"size {item!r} is not WIDTHxHEIGHT") from None
        sizes.append((width, height))
    return sizes


WARMUP_KEYWORDS = ("all", "auto")


def parse_batches(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        batches = [int(item) for item in text.replace(" ", "").split(",") if item]
    except ValueError:
        raise ValueError(f"batch sizes {text!r} are not comma-separated integers") from None
    if any(b < 1 for b in batches):
        raise ValueError(f"batch sizes {text!r} must be at least 1")
    return batches


def default_tiny_dir() -> Path:
    return Path.home() / ".cache" / "octoflux" / "tiny-flux"


def default_state_dir() -> Path:
    return Path.home() / ".cache" / "octoflux" / "state"


# `--help` shows the flags in these groups, in this order; a field names its group with
# `json_schema_extra=group(...)`. A field without one is listed under "other options".
GROUPS = {
    "model": "model and device",
    "server": "network and access",
    "limits": "limits and timeouts",
    "warmup": "warm-up",
    "speed": "speed and memory modes (octoflux/pipelines/optimize.py)",
    "async": "async results and shared state",
    "loras": "LoRAs",
    "safety": "safety checker",
    "webhooks": "webhooks",
    "browser": "browsers (playground, CORS)",
    "replicas": "more than one GPU (Ray Serve; octoflux/deploy/replicas.py)",
}


def group(name: str) -> dict:
    if name not in GROUPS:
        raise ValueError(f"unknown settings group {name!r}; add it to GROUPS")
    return {"group": name}


class Settings(BaseSettings):
    """Every field is a `serve` flag (`--max-queue`) and a variable (`OCTOFLUX_MAX_QUEUE`).

    A flag wins over the variable, which wins over the default. The flag's help is the field's
    description; a Literal type gives its choices; a bool gives `--NAME` (default False) or
    `--no-NAME` (default True).
    """

    model_config = SettingsConfigDict(env_prefix="OCTOFLUX_", extra="ignore", hide_input_in_errors=True)

    model: str = Field(
        "tiny",
        description="'tiny' (built-in random weights; tiny-schnell, tiny-kontext, tiny-fill, or tiny-family "
        "for all four), 'random-full' (FLUX.1-dev's architecture, random weights), a diffusers-format "
        "folder, a hub id in the local HF cache, or a .safetensors file; or several: "
        "ID=SOURCE[+TRANSFORMER_FILE],... with ids flux-dev, flux-schnell, flux-kontext-dev, flux-fill-dev",
        json_schema_extra=group("model"),
    )
    transformer: str = Field(
        "",
        description="a transformer file served in place of --model's: GGUF (Q8_0, Q4_K, ...), fp8 or bf16 "
        ".safetensors, in BFL, ComfyUI or diffusers keys; --model (a folder or hub id) gives the rest",
        json_schema_extra=group("model"),
    )
    text_encoder_2: str = Field(
        "",
        description="a T5 encoder file served in place of --model's: .safetensors (bf16, fp16 or fp8 e4m3fn) "
        "in transformers' keys, or GGUF (t5encoder); --model gives its config and tokenizer",
        json_schema_extra=group("model"),
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="where the model runs; auto: CUDA if present", json_schema_extra=group("model")
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="weights' dtype; auto: bfloat16 on a GPU, float32 on a CPU",
        json_schema_extra=group("model"),
    )
    tiny_dir: Path = Field(
        default_factory=default_tiny_dir,
        description="where --model tiny is written once (default: ~/.cache/octoflux/tiny-flux)",
        json_schema_extra=group("model"),
    )

    host: str = Field("127.0.0.1", description="address to bind", json_schema_extra=group("server"))
    port: int = Field(8000, description="port to bind", json_schema_extra=group("server"))
    api_keys: str = Field(
        "",
        description="comma-separated bearer tokens; empty means no auth",
        json_schema_extra=group("server"),
    )
    api_keys_file: Path | None = Field(
        None,
        description="TOML file of named keys with scopes and quotas (docs/operations.md); re-read on SIGHUP "
        "and when it changes",
        json_schema_extra=group("server"),
    )
    public_metrics: bool = Field(
        False,
        description="serve /metrics and the detailed /healthz to anyone, even with keys set",
        json_schema_extra=group("server"),
    )
    allow_unauthenticated: bool = Field(
        False,
        description="serve without API keys on a non-loopback address",
        json_schema_extra=group("server"),
    )
    public_url: str = Field(
        "",
        description="base of the absolute poll/response URLs (default: the request's own host)",
        json_schema_extra=group("server"),
    )

    max_body_mb: float = Field(
        64.0, description="largest request body in MB; larger gets 413", json_schema_extra=group("limits")
    )
    max_image_mb: float = Field(
        32.0, description="largest decoded request image in MB", json_schema_extra=group("limits")
    )
    max_image_pixels: int = Field(
        40_000_000, description="pixel limit for request images", json_schema_extra=group("limits")
    )
    max_queue: int = Field(
        32, description="requests waiting for the model; beyond it, 429", json_schema_extra=group("limits")
    )
    max_batch: int = Field(4, description="images per forward pass", json_schema_extra=group("limits"))
    request_timeout: float = Field(
        300.0,
        description="seconds a sync request may wait and run; past it a 504 (0: no limit)",
        json_schema_extra=group("limits"),
    )
    shutdown_timeout: float = Field(
        60.0,
        description="on SIGTERM, seconds the running job may take before it is interrupted; "
        "open connections get what is left of it, then are closed",
        json_schema_extra=group("limits"),
    )

    warmup: bool = Field(
        True,
        description="generate once per mode and size before /readyz turns 200",
        json_schema_extra=group("warmup"),
    )
    warmup_steps: int = Field(
        2, ge=1, description="steps of each warm-up run", json_schema_extra=group("warmup")
    )
    warmup_sizes: str = Field(
        "auto",
        description="sizes generated before /readyz turns 200: comma-separated WxH, 'all' (the 14 "
        "supported sizes) or 'auto' (all with --optimize other than none, else 512x512)",
        json_schema_extra=group("warmup"),
    )
    warmup_batches: str = Field(
        "auto",
        description="batch sizes warmed: comma-separated, 'all' (1..--max-batch) or 'auto' "
        "(all with --optimize other than none, else 1)",
        json_schema_extra=group("warmup"),
    )

    # What each mode costs in quality: octoflux/pipelines/optimize.py.
    optimize: Literal["none", "compile", "fp8", "cache"] = Field(
        "none", description="speed mode", json_schema_extra=group("speed")
    )
    cache_threshold: float = Field(
        0.08,
        ge=0.0,
        description="First Block Cache threshold for --optimize cache",
        json_schema_extra=group("speed"),
    )
    offload: Literal["none", "model", "sequential", "group"] = Field(
        "none",
        description="keep weights on the CPU: per model (model), per layer (sequential), or per block "
        "with the next block prefetched on a CUDA stream (group)",
        json_schema_extra=group("speed"),
    )
    quantize: Literal["none", "fp8", "int8", "nf4"] = Field(
        "none",
        description="quantize the transformer and T5 weights while loading",
        json_schema_extra=group("speed"),
    )
    attention_backend: str = Field(
        "auto",
        description="diffusers attention backend, 'auto' or 'native'",
        json_schema_extra=group("speed"),
    )
    prompt_cache_size: int = Field(
        32, ge=0, description="prompt embeddings kept (LRU); 0 disables", json_schema_extra=group("speed")
    )

    result_ttl: float = Field(
        3600.0, description="seconds a finished async result is kept", json_schema_extra=group("async")
    )
    max_attempts: int = Field(
        2,
        ge=1,
        description="runs an async job gets when the process running it is lost (killed, replica gone); "
        "then it fails saying so",
        json_schema_extra=group("async"),
    )
    lease_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds an async job's lease outlives the last renewal: how soon a job of a lost "
        "process runs again elsewhere",
        json_schema_extra=group("async"),
    )
    state_url: str = Field(
        "",
        description="where async results and asset records live: sqlite:///PATH/state.db "
        "(default: state.db in --state-dir) or redis://HOST:PORT/DB for replicas on several nodes",
        json_schema_extra=group("async"),
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="folder of the default SQLite state store (default: ~/.cache/octoflux/state)",
        json_schema_extra=group("async"),
    )
    state_repair: bool = Field(
        False,
        description="start on a damaged SQLite state store: move it aside, keep every row that still "
        "reads, log what was dropped (without it: a one-line refusal)",
        json_schema_extra=group("async"),
    )

    lora_dir: Path = Field(
        Path("loras"), description="the LoRA library folder", json_schema_extra=group("loras")
    )
    lora_cache_size: int = Field(8, description="LoRAs kept resident (LRU)", json_schema_extra=group("loras"))
    lora_slots: int = Field(
        2,
        ge=1,
        description="with --optimize other than none: hot-swap LoRA slots, the most LoRAs per request",
        json_schema_extra=group("loras"),
    )
    lora_max_rank: int = Field(
        64,
        ge=1,
        description="with --optimize other than none: the highest LoRA rank",
        json_schema_extra=group("loras"),
    )
    max_lora_mb: float = Field(
        2048.0, description="largest LoRA file accepted in MB", json_schema_extra=group("loras")
    )
    lora_upload_ttl_s: float = Field(
        3600.0, description="how long an asset upload (PUT) URL stays valid", json_schema_extra=group("loras")
    )

    safety_checker: Path | None = Field(
        None,
        description="folder of a diffusers StableDiffusionSafetyChecker (+ its preprocessor config); "
        "flagged images come back black with removed_for_safety true. Unset: no checking",
        json_schema_extra=group("safety"),
    )

    # More than one GPU: the same app as a Ray Serve deployment (octoflux/deploy/replicas.py).
    replicas: str = Field(
        "1",
        description="model replicas: a number, or 'auto' (one per visible GPU); 1 is a single process "
        "without Ray, more run on Ray Serve (pip install '.[ray]')",
        json_schema_extra=group("replicas"),
    )
    ray_address: str = Field(
        "",
        description="join this Ray cluster (e.g. 'auto' or 'head:6379') instead of starting one",
        json_schema_extra=group("replicas"),
    )
    min_replicas: int = Field(
        0,
        ge=0,
        description="with --max-replicas: the fewest replicas autoscaling keeps (default 1)",
        json_schema_extra=group("replicas"),
    )
    max_replicas: int = Field(
        0,
        ge=0,
        description="autoscale on ongoing requests per replica up to this many (0: a fixed count)",
        json_schema_extra=group("replicas"),
    )
    # One image on several GPUs (octoflux/deploy/context_parallel.py, docs/parallel.md).
    context_parallel: str = Field(
        "1",
        description="split each image's tokens over N processes of one machine (one GPU each; gloo ranks "
        "with --device cpu): N (Ulysses), or 'ring=R,ulysses=U'; N must divide the attention heads",
        json_schema_extra=group("replicas"),
    )
    context_parallel_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds any collective between the ranks may take before the server gives up on a "
        "stalled rank, fails the job and exits",
        json_schema_extra=group("replicas"),
    )

    # Webhooks for async jobs (octoflux/webhooks/dispatcher.py, docs/webhooks.md).
    webhook_secret: str = Field(
        "",
        repr=False,
        description="Standard Webhooks signing secret, 'whsec_' + base64 of 24-64 random bytes; "
        "empty: webhook headers are refused",
        json_schema_extra=group("webhooks"),
    )
    webhook_retries: int = Field(
        5,
        ge=0,
        le=10,
        description="retries after a failed webhook attempt (backoff 3, 6, 12, 24, 48 s...)",
        json_schema_extra=group("webhooks"),
    )
    webhook_allow_private: bool = Field(
        False,
        description="allow webhook URLs on loopback, private and link-local addresses (on-prem)",
        json_schema_extra=group("webhooks"),
    )

    # Browser apps on other origins (the playground at / is same-origin and needs none).
    cors_origins: str = Field(
        "",
        description="comma-separated origins allowed to call the API from a browser; empty: none",
        json_schema_extra=group("browser"),
    )

    @property
    def resolved_state_url(self) -> str:
        return self.state_url or f"sqlite:///{self.state_dir.resolve()}/state.db"

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def uses_ray(self) -> bool:
        return self.replicas != "1" or bool(self.ray_address) or self.max_replicas > 0

    @field_validator("replicas")
    @classmethod
    def _replicas_count(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise ValueError(f"replicas must be a number >= 1 or 'auto', not {value!r}")
        return value

    @field_validator("context_parallel")
    @classmethod
    def _context_parallel_layout(cls, value: str) -> str:
        from octoflux.pipelines.parallel import parse_layout

        parse_layout(value)  # raises ValueError with the accepted forms
        return value.strip().lower()

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_format(cls, value: str) -> str:
        return check_webhook_secret(value)

    @field_validator("model")
    @classmethod
    def _model_list_parse(cls, value: str) -> str:
        from octoflux.pipelines.model_list import parse_model_list

        parse_model_list(value)
        return value

    @property
    def model_entries(self):
        """`--model` as `ModelEntry`s (octoflux.pipelines.model_list); one unless it names several."""
        from octoflux.pipelines.model_list import ModelEntry, parse_model_list

        entries = parse_model_list(self.model)
        if len(entries) == 1 and self.transformer and not entries[0].transformer_file:
            entries = [ModelEntry(entries[0].id, entries[0].source, self.transformer)]
        return entries

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_parse(cls, value: str) -> str:
        if value.strip().lower() not in WARMUP_KEYWORDS:
            parse_sizes(value)
        return value

    @field_validator("warmup_batches")
    @classmethod
    def _batches_parse(cls, value: str) -> str:
        if value.strip().lower() not in WARMUP_KEYWORDS:
            parse_batches(value)
        return value

    @property
    def warmup_size_list(self) -> list[tuple[int, int]]:
        """The sizes to warm: 'all' and 'auto' resolved (compiled modes warm every supported size)."""
        from octoflux.core.models import SUPPORTED_RESOLUTIONS

        keyword = self.warmup_sizes.strip().lower()
        if keyword == "all" or (keyword == "auto" and self.optimize != "none"):
            return list(SUPPORTED_RESOLUTIONS)
        if keyword == "auto":
            return [(512, 512)]
        return parse_sizes(self.warmup_sizes)

    @property
    def warmup_batch_list(self) -> list[int]:
        keyword = self.warmup_batches.strip().lower()
        if keyword == "all" or (keyword == "auto" and self.optimize != "none"):
            return list(range(1, self.max_batch + 1))
        if keyword == "auto":
            return [1]
        return [b for b in parse_batches(self.warmup_batches) if b <= self.max_batch]

    @property
    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_auth_exposure(self) -> None:
        """Refuse to serve without keys on a non-loopback address unless told to."""
        has_keys = self.api_key_list or self.api_keys_file
        if not has_keys and not self.binds_loopback and not self.allow_unauthenticated:
            raise SystemExit(
                f"refusing to bind {self.host} without API keys: set OCTOFLUX_API_KEYS "
                "or --api-keys-file, or pass --allow-unauthenticated"
            )
