"""One test per private or undocumented diffusers/PEFT API in octoflux/pipelines/compat.py.

When a diffusers or PEFT release moves one, its test fails naming the API and the versions, so
the pin in pyproject.toml is raised knowingly.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from importlib.metadata import version

import pytest
import torch

from octoflux.pipelines import compat
from octoflux.pipelines.tiny_lora import make_lora

VERSIONS = f"diffusers {version('diffusers')}, peft {version('peft')}"


@contextmanager
def private_api(name: str):
    """Turn any failure into one that names the API that moved."""
    try:
        yield
    except Exception as exc:
        pytest.fail(f"private API {name} moved or changed ({VERSIONS}): {type(exc).__name__}: {exc}")


@pytest.fixture
def pipe(tiny_checkpoint):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_create_lora_config_builds_a_peft_config_from_a_text_encoder_state_dict():
    state = {k.removeprefix("text_encoder."): v for k, v in make_lora(1, text_encoder=True).items()}
    state = {k: v for k, v in state.items() if not k.startswith("transformer.")}
    ranks = {k: v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
    with private_api("diffusers.utils.peft_utils._create_lora_config"):
        config = compat.text_encoder_lora_config(state, None, None, ranks)
        assert config.r == 4 and config.lora_alpha == 4
        targets = {m.rpartition(".")[2] for m in config.target_modules}
        assert targets == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_load_lora_into_transformer_takes_the_private_pipeline_argument(pipe):
    from diffusers import FluxPipeline

    with private_api("FluxPipeline.load_lora_into_transformer(_pipeline=, hotswap=, metadata=)"):
        parameters = inspect.signature(FluxPipeline.load_lora_into_transformer).parameters
        assert {"_pipeline", "hotswap", "metadata", "network_alphas", "adapter_name"} <= set(parameters)
        state = {k: v for k, v in make_lora(2).items() if k.startswith("transformer.")}
        compat.load_into_transformer(pipe, state, None, None, "probe")
        assert "probe" in pipe.transformer.peft_config


def test_hf_peft_config_loaded_flags_a_model_that_had_peft_layers(pipe):
    with private_api("ModelMixin._hf_peft_config_loaded"):
        assert hasattr(pipe.transformer, "_hf_peft_config_loaded")
        assert compat.has_peft_layers(pipe.transformer) is False
        state = {k: v for k, v in make_lora(3).items() if k.startswith("transformer.")}
        compat.load_into_transformer(pipe, state, None, None, "probe")
        assert compat.has_peft_layers(pipe.transformer) is True


def test_lora_base_text_encoder_helpers_add_switch_and_remove_clip_adapters(pipe):
    from peft import LoraConfig, inject_adapter_in_model

    clip = pipe.text_encoder
    ids = torch.arange(1, 9)[None]
    base = clip(ids).last_hidden_state
    config = LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, clip, adapter_name="probe")
    names = (
        "diffusers.loaders.lora_base.enable_lora_for_text_encoder / set_adapters_for_text_encoder / "
        "disable_lora_for_text_encoder / delete_adapter_layers"
    )
    with private_api(names):
        compat.set_text_encoder_adapters(clip, ["probe"], [1.0])
        assert not torch.equal(clip(ids).last_hidden_state, base)
        compat.set_text_encoder_adapters(clip, [], [])
        assert torch.equal(clip(ids).last_hidden_state, base)
        compat.delete_adapter_layers(clip, "probe")
        assert "probe" not in getattr(clip, "peft_config", {})
        assert not any("probe" in name for name, _ in clip.named_parameters())


def test_kohya_clip_keys_convert_to_peft_keys():
    old = {
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": torch.zeros(2, 32),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": torch.zeros(32, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight": torch.zeros(2, 32),
    }
    with private_api("diffusers.utils.convert_state_dict_to_diffusers/convert_state_dict_to_peft old keys"):
        assert set(compat.text_encoder_keys_to_peft(old)) == {
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_A.weight",
        }


def test_first_block_cache_leader_hook_decision_can_be_observed(pipe):
    from diffusers import FirstBlockCacheConfig

    decisions: list[bool] = []
    hook = "diffusers.hooks.first_block_cache._FBC_LEADER_BLOCK_HOOK"
    with private_api(f"{hook} and its hook's _should_compute_remaining_blocks"):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        compat.observe_first_block_cache(pipe.transformer, decisions.append)
        pipe(prompt="x", width=64, height=64, num_inference_steps=3, generator=torch.manual_seed(0))
        assert decisions == [True, True, True]  # threshold 0: every step computes every block


def test_reset_stateful_cache_exists_on_the_flux_transformer(pipe):
    from diffusers import FirstBlockCacheConfig

    with private_api("ModelMixin/CacheMixin._reset_stateful_cache"):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        compat.reset_step_cache(pipe.transformer)


def test_execution_device_is_where_the_pipeline_runs(pipe):
    with private_api("DiffusionPipeline._execution_device"):
        assert compat.execution_device(pipe) == torch.device("cpu")


def test_enable_lora_hotswap_makes_scalings_tensors_that_slots_fill_in_place(pipe):
    """LoraSlots writes request weights into PEFT's scalings in place; that needs them to be tensors
    after diffusers' enable_lora_hotswap (PEFT's prepare_model_for_compiled_hotswap)."""
    from peft.tuners.lora import LoraLayer

    with private_api("enable_lora_hotswap → peft LoraLayer.scaling[adapter] as a tensor"):
        pipe.transformer.enable_lora_hotswap(target_rank=8, check_compiled="ignore")
        state = {k: v for k, v in make_lora(4).items() if k.startswith("transformer.")}
        compat.load_into_transformer(pipe, state, None, None, "slot")
        layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
        assert layers and all(torch.is_tensor(layer.scaling["slot"]) for layer in layers)
        assert all(layer.lora_A["slot"].weight.shape[0] == 8 for layer in layers)  # padded to the target


def _tiny_transformer_state(tiny_checkpoint) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from octoflux.pipelines.export import folder_transformer_state

    return folder_transformer_state(Path(tiny_checkpoint))


def test_flux_bfl_converter_reads_the_width_from_the_file(tiny_checkpoint):
    from diffusers import FluxTransformer2DModel

    from octoflux.pipelines.bfl_layout import diffusers_to_bfl

    state = _tiny_transformer_state(tiny_checkpoint)
    config = dict(FluxTransformer2DModel.load_config(tiny_checkpoint, subfolder="transformer"))
    for comfy in (False, True):
        with private_api(
            "diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers"
        ):
            converted = compat.flux_transformer_to_diffusers(diffusers_to_bfl(state, comfy=comfy), config)
        assert converted.keys() == state.keys()
        assert all(torch.equal(converted[name], state[name]) for name in state)


def test_diffusers_flux_converter_still_assumes_flux1_width(tiny_checkpoint):
    """When this fails, diffusers reads the width itself: drop the split in flux_transformer_to_diffusers."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from octoflux.pipelines.bfl_layout import diffusers_to_bfl

    bfl = diffusers_to_bfl(_tiny_transformer_state(tiny_checkpoint))
    with pytest.raises(RuntimeError, match="split"):
        convert_flux_transformer_checkpoint_to_diffusers(bfl)


def test_gguf_parameter_is_what_the_gguf_quantizer_loads():
    import gguf
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    weights = torch.randn(4, 64)
    raw = torch.from_numpy(gguf.quants.quantize(weights.numpy(), gguf.GGMLQuantizationType.Q8_0))
    with private_api("diffusers.quantizers.gguf.utils.GGUFParameter"):
        tagged = compat.gguf_parameter(raw, gguf.GGMLQuantizationType.Q8_0)
        assert tuple(tagged.quant_shape) == (4, 64)
        assert torch.allclose(dequantize_gguf_tensor(tagged).float(), weights, atol=0.02)
        assert "Q8_0" in compat.gguf_supported_type_names()
    plain = torch.zeros(3)
    assert compat.gguf_parameter(plain, gguf.GGMLQuantizationType.F32) is plain
