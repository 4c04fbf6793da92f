"""A tiny random-weight FLUX.1-dev (or schnell), written to disk in diffusers format.

Same structure as FLUX.1-dev (VAE scale factor 8, 16 latent channels packed 2x2 into 64
transformer channels, guidance embedding, CLIP + T5 encoders, flow-matching scheduler with
dynamic shifting) with widths small enough that a 1024x1024 image takes about a second on a CPU.
Tokenizers are built offline, so nothing is downloaded. The schnell variant differs as
FLUX.1-schnell does: no guidance embedding and a fixed-shift scheduler.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TINY_SEED = 0
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
TEXT_WIDTH = 32


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _clip_tokenizer(workdir: Path):
    from transformers import CLIPTokenizer

    # Without merges every byte is its own token; CLIP marks word ends with "</w>".
    symbols = _byte_symbols()
    vocab_list = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    vocab_file = workdir / "vocab.json"
    merges_file = workdir / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    merges_file.write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        model_max_length=CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
    )


def _t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)] + ["▁"]
    model = models.Unigram([(p, -1.0) for p in pieces], unk_id=2, byte_fallback=False)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend,
        model_max_length=T5_MAX_LENGTH,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
    )


VARIANTS = ("dev", "schnell")


def build_tiny_pipeline(variant: str = "dev"):
    """Build the tiny FluxPipeline in memory with deterministic random weights."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {VARIANTS}")
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(TINY_SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=variant == "dev",
        axes_dims_rope=(4, 6, 6),
    )
    # mid_block_add_attention=False: the mid-block self-attention is quadratic in latent
    # positions and would make a 1024x1024 decode ~7x slower on a CPU.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=2 + 2 * 256,
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=TEXT_WIDTH,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=128,
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    # FLUX.1-schnell's scheduler config: a fixed shift of 1.0, no resolution-dependent shift.
    schnell = variant == "schnell"
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if schnell else 3.0,
        use_dynamic_shifting=not schnell,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = _clip_tokenizer(Path(workdir))
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


def write_tiny_checkpoint(directory: str | Path, variant: str = "dev") -> Path:
    """Write the tiny checkpoint to `directory` (diffusers format) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(variant).save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_checkpoint_is_complete(directory: Path) -> bool:
    return (directory / "model_index.json").is_file() and (
        directory / "transformer" / "config.json"
    ).is_file()
