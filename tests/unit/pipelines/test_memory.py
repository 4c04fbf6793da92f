"""The memory estimate: counted from safetensors headers and configs, compared with a given budget."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from octoflux.pipelines.memory import (
    GIB,
    WillNotFit,
    check_model_fits,
    count_folder,
    count_random_full,
    estimate,
    read_safetensors_header,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def write_header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A .safetensors file whose header declares `tensors` but holds no data: reading data would fail."""
    header = {
        name: {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
        for name, (dtype, shape) in tensors.items()
    }
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.fixture
def synthetic_flux(tmp_path) -> Path:
    """A diffusers-like folder: 12e9 bf16 transformer weights (as 3 shards), 4.7e9 T5, small CLIP and VAE."""
    root = tmp_path / "big-flux"
    (root / "model_index.json").parent.mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    for shard in range(3):
        name = f"diffusion_pytorch_model-0000{shard + 1}-of-00003.safetensors"
        write_header_only(root / "transformer" / name, {f"w{shard}": ("BF16", [4_000_000, 1000])})
    # A variant copy beside the plain file is not counted twice.
    write_header_only(root / "text_encoder_2" / "model.safetensors", {"w": ("BF16", [4_700_000, 1000])})
    write_header_only(root / "text_encoder_2" / "model.fp16.safetensors", {"w": ("F16", [4_700_000, 1000])})
    write_header_only(root / "text_encoder" / "model.safetensors", {"w": ("F32", [123_000, 1000])})
    write_header_only(
        root / "vae" / "diffusion_pytorch_model.safetensors",
        {"w": ("F32", [84_000, 1000]), "n": ("I64", [10])},
    )
    return root


def test_headers_are_read_without_tensor_data(synthetic_flux):
    header = read_safetensors_header(synthetic_flux / "vae" / "diffusion_pytorch_model.safetensors")
    assert header["w"]["shape"] == [84_000, 1000]
    weights = count_folder(synthetic_flux)
    assert weights.float_elements["transformer"] == 12_000_000_000
    assert weights.float_elements["text_encoder_2"] == 4_700_000_000
    assert weights.other_bytes["vae"] == 80


def test_dtype_quantization_and_offload_change_the_estimate(synthetic_flux):
    weights = count_folder(synthetic_flux)
    bf16 = estimate(weights, torch.bfloat16)
    fp32 = estimate(weights, torch.float32)
    assert bf16.components["transformer"] == 24_000_000_000
    assert fp32.components["transformer"] == 2 * bf16.components["transformer"]
    int8 = estimate(weights, torch.bfloat16, quantize="int8")
    nf4 = estimate(weights, torch.bfloat16, quantize="nf4")
    assert int8.components["transformer"] == bf16.components["transformer"] // 2
    assert nf4.components["transformer"] == bf16.components["transformer"] // 4
    assert int8.components["vae"] == bf16.components["vae"]  # only the transformer and T5 are quantized
    model = estimate(weights, torch.bfloat16, offload="model")
    sequential = estimate(weights, torch.bfloat16, offload="sequential")
    assert model.host_bytes == sum(bf16.components.values())
    assert sequential.device_bytes < model.device_bytes < bf16.device_bytes
    assert model.device_bytes > bf16.components["transformer"]  # the largest component, plus margin


def test_the_tiny_checkpoint_fits_a_small_budget(tiny_checkpoint):
    need = check_model_fits(tiny_checkpoint, CPU, torch.float32, device_free=1 * GIB)
    assert set(need.components) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert 0 < sum(need.components.values()) < 10 * 2**20


def test_a_big_folder_on_a_small_gpu_is_refused_with_the_ways_out(synthetic_flux):
    with pytest.raises(WillNotFit) as refused:
        check_model_fits(str(synthetic_flux), CUDA, torch.bfloat16, device_free=24 * GIB, host_free=64 * GIB)
    message = str(refused.value)
    assert "will not fit" in message and "free on cuda" in message
    assert "--offload model" in message and "--quantize" in message
    assert "\n" not in message
    # The ways out work: offloaded, the GPU holds the largest component only.
    check_model_fits(
        str(synthetic_flux), CUDA, torch.bfloat16, offload="model", device_free=40 * GIB, host_free=64 * GIB
    )
    check_model_fits(str(synthetic_flux), CUDA, torch.bfloat16, quantize="nf4", device_free=24 * GIB)


def test_offloading_needs_the_weights_in_host_ram(synthetic_flux):
    with pytest.raises(WillNotFit, match="offloaded weights"):
        check_model_fits(
            str(synthetic_flux),
            CUDA,
            torch.bfloat16,
            offload="sequential",
            device_free=80 * GIB,
            host_free=8 * GIB,
        )


def test_random_full_is_sized_from_flux_dev_architecture_and_refused_on_24gb_of_ram():
    weights = count_random_full()
    assert 11.8e9 < weights.float_elements["transformer"] < 12.0e9
    assert 4.7e9 < weights.float_elements["text_encoder_2"] < 4.8e9
    with pytest.raises(WillNotFit) as refused:
        check_model_fits("random-full", CPU, torch.float32, device_free=24 * GIB)
    assert "--dtype bfloat16" in str(refused.value) and "a GPU" in str(refused.value)
    # random-full is built whole before it is quantized: quantizing is no way out for its peak.
    assert "--quantize" not in str(refused.value)


def fp8_flux_file(path: Path) -> Path:
    """A header-only fp8 single file of 12e9 weights, named as a BFL FLUX.1 transformer."""
    write_header_only(
        path,
        {
            "double_blocks.0.img_attn.qkv.weight": ("F8_E4M3", [12_000_000, 1000]),
            "img_in.bias": ("BF16", [3072]),
        },
    )
    return path


def test_a_transformer_file_replaces_the_folders_transformer_at_its_stored_size(synthetic_flux, tmp_path):
    file = fp8_flux_file(tmp_path / "flux1-dev-fp8.safetensors")
    folder = check_model_fits(str(synthetic_flux), CUDA, torch.bfloat16, device_free=80 * GIB)
    with_file = check_model_fits(
        str(synthetic_flux), CUDA, torch.bfloat16, device_free=80 * GIB, transformer_file=str(file)
    )
    assert folder.components["transformer"] == 24_000_000_000  # 12e9 bf16 weights
    assert with_file.components["transformer"] == 12_000_000_000 + 3072 * 2  # fp8 stays 1 byte
    assert with_file.components["text_encoder_2"] == folder.components["text_encoder_2"]


def test_a_gguf_file_is_counted_by_its_tensor_types(tiny_checkpoint, tmp_path):
    from octoflux.pipelines.export import export_transformer
    from octoflux.pipelines.transformer_file import inspect_transformer_file

    file = export_transformer(Path(tiny_checkpoint), tmp_path / "tiny-Q4_0.gguf", "gguf:Q4_0")
    need = check_model_fits(tiny_checkpoint, CPU, torch.float32, transformer_file=str(file))
    tensors = inspect_transformer_file(file).tensors.values()
    quantized = sum(t.nbytes for t in tensors if t.kind == "Q4_0")
    plain = sum(t.elements for t in tensors if t.kind == "F32")
    assert quantized and need.components["transformer"] == quantized + 4 * plain


def test_a_transformer_file_too_big_for_the_gpu_is_refused_before_loading(synthetic_flux, tmp_path):
    file = fp8_flux_file(tmp_path / "flux1-dev-fp8.safetensors")
    with pytest.raises(WillNotFit, match="--offload model \\(or group, sequential\\)"):
        check_model_fits(
            str(synthetic_flux), CUDA, torch.bfloat16, device_free=16 * GIB, transformer_file=str(file)
        )
    grouped = check_model_fits(
        str(synthetic_flux), CUDA, torch.bfloat16, "none", "group", 16 * GIB, 64 * GIB, str(file)
    )
    assert grouped.device_bytes < 16 * GIB  # fits where the whole model does not
