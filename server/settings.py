"""Every knob of the server, once: a CLI flag and an OCTOFLUX_* environment variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        "auto",
        description="sizes generated before /readyz turns 200: comma-separated WxH, 'all' (the 14 "
        "supported sizes) or 'auto' (all with --optimize other than none, else 512x512)",
    )
    warmup_batches: str = Field(
        "auto",
        description="batch sizes warmed: comma-separated, 'all' (1..--max-batch) or 'auto' "
        "(all with --optimize other than none, else 1)",
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

    request_timeout: float = Field(
        300.0, description="seconds a sync request may wait and run; past it a 504 (0: no limit)"
    )
    shutdown_timeout: float = Field(
        60.0, description="on SIGTERM, seconds the running job may take before it is interrupted"
    )
    result_ttl: float = Field(3600.0, description="seconds a finished async result is kept")
    max_result_mb: float = Field(
        512.0, description="async results kept in memory; older ones spill to --results-dir"
    )
    results_dir: Path | None = Field(
        None, description="where results over --max-result-mb go (default: a temp dir)"
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

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

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
        from server.schemas import SUPPORTED_RESOLUTIONS

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
        if not self.api_key_list and not self.binds_loopback and not self.allow_unauthenticated:
            raise SystemExit(
                f"refusing to bind {self.host} without API keys: set OCTOFLUX_API_KEYS "
                "or pass --allow-unauthenticated"
            )
