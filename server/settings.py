"""Every knob of the server, once: a CLI flag and an OCTOFLUX_* environment variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.webhooks import check_webhook_secret


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


def default_tiny_dir() -> Path:
    return Path.home() / ".cache" / "octoflux" / "tiny-flux"


def default_state_dir() -> Path:
    return Path.home() / ".cache" / "octoflux" / "state"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OCTOFLUX_", extra="ignore")

    model: str = Field(
        "tiny",
        description="'tiny', 'random-full' (FLUX.1-dev's architecture, random weights), "
        "a diffusers-format folder, a hub id, or a .safetensors file",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    tiny_dir: Path = Field(default_factory=default_tiny_dir)

    api_keys: str = Field("", description="comma-separated bearer tokens; empty means no auth")
    allow_unauthenticated: bool = False

    max_body_mb: float = 64.0
    max_image_mb: float = 32.0
    max_image_pixels: int = 40_000_000
    max_queue: int = 32
    max_batch: int = 4
    warmup: bool = True
    warmup_steps: int = 2
    warmup_sizes: str = Field(
        "512x512", description="comma-separated WxH sizes compiled and warmed before /readyz turns 200"
    )

    # Speed and memory modes: see pipelines/optimize.py for what each costs in quality.
    optimize: Literal["none", "compile", "fp8", "cache"] = "none"
    cache_threshold: float = Field(
        0.08, ge=0.0, description="First Block Cache threshold for --optimize cache"
    )
    offload: Literal["none", "model", "sequential"] = "none"
    quantize: Literal["none", "fp8", "int8", "nf4"] = "none"
    attention_backend: str = Field("auto", description="diffusers attention backend, 'auto' or 'native'")
    prompt_cache_size: int = Field(32, ge=0, description="prompt embeddings kept (LRU); 0 disables")

    safety_checker: Path | None = Field(
        None,
        description="folder of a diffusers StableDiffusionSafetyChecker (+ its preprocessor config); "
        "flagged images come back black with removed_for_safety true. Unset: no checking",
    )

    request_timeout: float = Field(
        300.0, description="seconds a sync request may wait and run; past it a 504 (0: no limit)"
    )
    shutdown_timeout: float = Field(
        60.0, description="on SIGTERM, seconds the running job may take before it is interrupted"
    )
    result_ttl: float = Field(3600.0, description="seconds a finished async result is kept")
    state_url: str = Field(
        "",
        description="where async results and asset records live: sqlite:///PATH/state.db "
        "(default: state.db in --state-dir) or redis://HOST:PORT/DB for replicas on several nodes",
    )
    state_dir: Path = Field(
        default_factory=default_state_dir, description="folder of the default SQLite state store"
    )
    public_url: str = Field(
        "", description="base of the absolute poll/response URLs (default: the request's own host)"
    )

    lora_dir: Path = Path("loras")
    lora_cache_size: int = 8
    lora_slots: int = Field(
        2,
        ge=1,
        description="with --optimize other than none: hot-swap LoRA slots, the most LoRAs per request",
    )
    lora_max_rank: int = Field(64, ge=1, description="with --optimize other than none: the highest LoRA rank")
    max_lora_mb: float = 2048.0
    lora_upload_ttl_s: float = Field(3600.0, description="how long an asset upload (PUT) URL stays valid")

    # More than one GPU: the same app as a Ray Serve deployment (server/replicas.py).
    replicas: str = Field(
        "1",
        description="model replicas: a number, or 'auto' (one per visible GPU); 1 is a single process "
        "without Ray, more run on Ray Serve (pip install '.[ray]')",
    )
    ray_address: str = Field(
        "", description="join this Ray cluster (e.g. 'auto' or 'head:6379') instead of starting one"
    )
    min_replicas: int = Field(
        0, ge=0, description="with --max-replicas: the fewest replicas autoscaling keeps (default 1)"
    )
    max_replicas: int = Field(
        0, ge=0, description="autoscale on ongoing requests per replica up to this many (0: a fixed count)"
    )

    # Webhooks for async jobs (server/webhooks.py, docs/webhooks.md).
    webhook_secret: str = Field(
        "",
        repr=False,
        description="Standard Webhooks signing secret, 'whsec_' + base64 of 24-64 random bytes; "
        "empty: webhook headers are refused",
    )
    webhook_retries: int = Field(
        5, ge=0, le=10, description="retries after a failed webhook attempt (backoff 3, 6, 12, 24, 48 s...)"
    )
    webhook_allow_private: bool = Field(
        False, description="allow webhook URLs on loopback, private and link-local addresses (on-prem)"
    )

    @property
    def resolved_state_url(self) -> str:
        return self.state_url or f"sqlite:///{self.state_dir.resolve()}/state.db"

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

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_parse(cls, value: str) -> str:
        parse_sizes(value)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_format(cls, value: str) -> str:
        return check_webhook_secret(value)

    @property
    def warmup_size_list(self) -> list[tuple[int, int]]:
        return parse_sizes(self.warmup_sizes)

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
        if not self.api_key_list and not self.binds_loopback and not self.allow_unauthenticated:
            raise SystemExit(
                f"refusing to bind {self.host} without API keys: set OCTOFLUX_API_KEYS "
                "or pass --allow-unauthenticated"
            )
