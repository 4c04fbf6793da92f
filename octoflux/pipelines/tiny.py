"""A tiny random-weight FLUX.1-dev (or schnell, Kontext, Fill), written to disk in diffusers format.

Same structure as FLUX.1-dev (VAE scale factor 8, 16 latent channels packed 2x2 into 64
transformer channels, guidance embedding, CLIP + T5 encoders, flow-matching scheduler with
dynamic shifting) with widths small enough that a 1024x1024 image takes about a second on a CPU.
Tokenizers are built offline, so nothing is downloaded. The schnell variant differs as
FLUX.1-schnell does: no guidance embedding and a fixed-shift scheduler. Kontext is dev's transformer
under FluxKontextPipeline; Fill's transformer reads 384 channels.
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


VARIANTS = ("dev", "schnell", "kontext", "fill")
PIPELINE_CLASSES = {
    "dev": "FluxPipeline",
    "schnell": "FluxPipeline",
    "kontext": "FluxKontextPipeline",
    "fill": "FluxFillPipeline",
}
# Written beside model_index.json; a cached tiny folder of another version is rebuilt.
TINY_VERSION = 2
VERSION_FILE = "octoflux-tiny.json"
# Seeds of each variant's own transformer; the encoders, tokenizers and VAE are the same in every variant.
TRANSFORMER_SEEDS = {"schnell": 1, "kontext": 2, "fill": 3}
# Random init barely lets Kontext's picture tokens (or Fill's kept area) reach the generated tokens through
# attention: a mirrored input moved no pixel by more than 1/255. Louder attention values and output make a
# mirrored input change ~90% of Kontext's pixels and ~70% of Fill's repainted ones.
CONDITIONING_VALUE_SCALE = 32.0
CONDITIONING_OUTPUT_SCALE = 8.0


def _transformer(variant: str):
    from diffusers import FluxTransformer2DModel

    fill = variant == "fill"
    return FluxTransformer2DModel(
        patch_size=1,
        # Fill reads the noise (64), the masked picture (64) and the 8x8-packed mask (256) side by side.
        in_channels=384 if fill else 64,
        out_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=variant != "schnell",
        axes_dims_rope=(4, 6, 6),
    )


def _strengthen(transformer) -> None:
    """Make the input picture matter to a random-weight Kontext or Fill (see the constants above)."""
    with torch.no_grad():
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            block.attn.to_v.weight.mul_(CONDITIONING_VALUE_SCALE)
        transformer.proj_out.weight.mul_(CONDITIONING_OUTPUT_SCALE)


def build_tiny_pipeline(variant: str = "dev"):
    """Build the tiny pipeline of `variant` in memory with deterministic random weights.

    Every variant has the same text encoders, tokenizers and VAE (bit for bit), as FLUX.1's do, so a
    server serving several shares them; dev's weights are those of earlier versions.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {VARIANTS}")
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(TINY_SEED)
    # Built first whatever the variant, so the random stream reaches the shared components in one state.
    transformer = _transformer("dev")
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
    if variant != "dev":
        torch.manual_seed(TRANSFORMER_SEEDS[variant])
        transformer = _transformer(variant)
        if variant in ("kontext", "fill"):
            _strengthen(transformer)
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
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[variant])
    return pipeline_class(
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
    (directory / VERSION_FILE).write_text(json.dumps({"version": TINY_VERSION, "variant": variant}))
    return directory


def tiny_checkpoint_is_complete(directory: Path, variant: str | None = None) -> bool:
    """Written whole, by this version of the builder (for `variant`, when given)."""
    try:
        written = json.loads((directory / VERSION_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        written.get("version") == TINY_VERSION
        and variant in (None, written.get("variant"))
        and (directory / "transformer" / "config.json").is_file()
    )
