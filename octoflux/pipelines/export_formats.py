"""What `octoflux export-transformer` and `export-text-encoder` can write: named without torch, so that
building the CLI's parser loads no library."""

GGUF_TYPES = ("Q8_0", "Q4_0", "BF16")
FORMATS = (*(f"gguf:{kind}" for kind in GGUF_TYPES), "fp8", "bf16")
LAYOUTS = ("bfl", "comfy", "diffusers")
