"""FLUX.1-dev's full architecture with random weights, built directly on the target device.

Same modules, widths and depths as black-forest-labs/FLUX.1-dev (transformer, T5-XXL encoder,
CLIP-L text encoder, VAE), so it costs the same FLOPs and memory as the real model: timings
measured on it transfer. Nothing is downloaded. Parameters are created in the target dtype on
the target device (no ~24 GB float32 copy in host memory first). The tokenizers are the tiny
model's offline ones: token ids stay inside the real vocabularies and the padded sequence
lengths (77 for CLIP, 512 for T5) are the real ones, so the encoders' compute is unchanged.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from octoflux.pipelines.tiny import _clip_tokenizer, _t5_tokenizer

RANDOM_FULL_SEED = 0

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# black-forest-labs/FLUX.1-dev vae/config.json
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)

# text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
FLUX_DEV_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

# text_encoder_2/config.json (google/t5-v1_1-xxl's encoder)
FLUX_DEV_T5 = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_components(device: torch.device | str, dtype: torch.dtype) -> dict:
    """The four FLUX.1-dev models, parameters created on `device` in `dtype` (use "meta" to size them)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    device = torch.device(device)
    if device.type != "meta":
        torch.manual_seed(RANDOM_FULL_SEED)
    with torch.device(device), _default_dtype(dtype):
        return dict(
            transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
            vae=AutoencoderKL(**FLUX_DEV_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**FLUX_DEV_CLIP)),
            text_encoder_2=T5EncoderModel(T5Config(**FLUX_DEV_T5)),
        )


def build_random_full_pipeline(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A FluxPipeline with FLUX.1-dev's architecture and deterministic random weights on `device`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    components = build_components(device, dtype)
    for model in components.values():
        model.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = _clip_tokenizer(Path(workdir))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        tokenizer=tokenizer,
        tokenizer_2=_t5_tokenizer(),
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
