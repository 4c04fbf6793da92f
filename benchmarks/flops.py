"""Analytic FLOP count of one FLUX transformer forward (one denoising step), and MFU.

Counting a multiply-add as 2 FLOPs, with d = hidden size (heads x head dim), r = MLP ratio (4),
T = text tokens (T5 sequence length, 512), I = image tokens ((H/16) x (W/16): VAE factor 8,
then 2x2 patches), L = T + I:

  double block (19): each stream (image tokens, text tokens) has q, k, v, out (4 d^2) and an
      MLP (2 r d^2) per token -> 2 (4 + 2r) d^2 L; joint attention over L tokens: QK^T and
      AV -> 4 L^2 d.
  single block (38): one fused in-projection to q, k, v and the MLP (3 + r) d^2, one fused
      out-projection from attention and MLP (1 + r) d^2 per token -> 2 (4 + 2r) d^2 L;
      attention 4 L^2 d.
  so each block costs  2 (4 + 2r) d^2 L + 4 L^2 d  = 24 d^2 L + 4 L^2 d  for r = 4,
  plus the embedders and final projection: 2 (c_in d I + c_txt d T + d c_in I)
      (c_in = 64 packed latent channels, c_txt = 4096 T5 width).

Per-sample modulation, timestep/guidance/pooled embeddings and RoPE are O(d^2) per image, not
per token: under 0.1% and left out. FLUX.1-dev is guidance-distilled: one forward per step,
no classifier-free-guidance doubling. At 1024x1024 (I = 4096, L = 4608) this is ~74.4 TFLOP.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
}


@dataclass(frozen=True)
class FluxShape:
    """The transformer's sizes that the FLOP count depends on (FLUX.1-dev's by default)."""

    double_blocks: int = 19
    single_blocks: int = 38
    heads: int = 24
    head_dim: int = 128
    mlp_ratio: float = 4.0
    in_channels: int = 64
    text_dim: int = 4096
    text_tokens: int = 512

    @classmethod
    def from_config(cls, config, text_tokens: int = 512) -> FluxShape:
        """Read the sizes from a FluxTransformer2DModel config."""
        return cls(
            double_blocks=config.num_layers,
            single_blocks=config.num_single_layers,
            heads=config.num_attention_heads,
            head_dim=config.attention_head_dim,
            in_channels=config.in_channels,
            text_dim=config.joint_attention_dim,
            text_tokens=text_tokens,
        )


def image_tokens(width: int, height: int) -> int:
    """Latent positions after the VAE's 8x downsampling and 2x2 packing."""
    return (height // 16) * (width // 16)


def transformer_flops_per_step(
    width: int, height: int, batch: int = 1, shape: FluxShape = FluxShape()
) -> float:
    """FLOPs of one transformer forward for `batch` images of width x height (formula in the docstring)."""
    d = shape.heads * shape.head_dim
    n_img = image_tokens(width, height)
    n_txt = shape.text_tokens
    length = n_img + n_txt
    per_block = 2 * (4 + 2 * shape.mlp_ratio) * d * d * length + 4 * length * length * d
    blocks = shape.double_blocks + shape.single_blocks
    embed = 2 * (shape.in_channels * d * n_img + shape.text_dim * d * n_txt + d * shape.in_channels * n_img)
    return batch * (blocks * per_block + embed)


def peak_tflops(device_name: str | None) -> float | None:
    """The bf16 dense peak for a GPU name as torch reports it, or None when unknown."""
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(part in device_name for part in key.split()):
            return PEAK_BF16_TFLOPS[key]
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (None without a known peak)."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)
