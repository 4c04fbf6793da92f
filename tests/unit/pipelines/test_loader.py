"""Loading FLUX from disk like real weights; the tiny checkpoint's structure; the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from octoflux import cli
from octoflux.pipelines.loader import ModelLoadError, load_flux_pipeline, model_source
from octoflux.pipelines.tiny import tiny_checkpoint_is_complete

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_flux_pipeline(tiny_checkpoint, CPU, torch.float32)


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loads_tiny_checkpoint_from_disk_by_path(loaded, tiny_checkpoint):
    from diffusers import FluxPipeline

    assert isinstance(loaded, FluxPipeline)
    assert (Path(tiny_checkpoint) / "model_index.json").is_file()
    assert (Path(tiny_checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert loaded.transformer.device == CPU
    assert loaded.transformer.dtype == torch.float32


def test_tiny_checkpoint_mirrors_flux_dev_structure(loaded):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    assert isinstance(loaded.transformer, FluxTransformer2DModel)
    assert isinstance(loaded.vae, AutoencoderKL)
    assert isinstance(loaded.text_encoder, CLIPTextModel)
    assert isinstance(loaded.text_encoder_2, T5EncoderModel)
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    assert loaded.vae_scale_factor == 8
    assert loaded.vae.config.latent_channels == 16
    # 16 latent channels packed 2x2 into the transformer's 64 input channels.
    assert loaded.transformer.config.in_channels == 64 == 4 * loaded.vae.config.latent_channels
    assert loaded.transformer.config.guidance_embeds is True
    assert loaded.scheduler.config.use_dynamic_shifting is True
    assert loaded.transformer.config.joint_attention_dim == loaded.text_encoder_2.config.d_model
    assert loaded.transformer.config.pooled_projection_dim == loaded.text_encoder.config.projection_dim


def test_tiny_tokenizers_work_offline(loaded):
    clip = loaded.tokenizer("a red fox", padding="max_length", max_length=77, truncation=True)
    t5 = loaded.tokenizer_2("a red fox", padding="max_length", max_length=512, truncation=True)
    assert len(clip.input_ids) == 77 and len(t5.input_ids) == 512
    assert loaded.tokenizer("a red fox").input_ids != loaded.tokenizer("a blue fox").input_ids
    assert loaded.tokenizer_2("a red fox").input_ids != loaded.tokenizer_2("a blue fox").input_ids


def test_loader_honours_dtype(tiny_checkpoint):
    pipe = load_flux_pipeline(tiny_checkpoint, CPU, torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("source", ["/nonexistent/flux-folder", "not-a-model"])
def test_missing_model_is_a_model_load_error(source):
    with pytest.raises(ModelLoadError):
        load_flux_pipeline(source, CPU, torch.float32)


def test_make_tiny_cli_writes_a_loadable_checkpoint(tmp_path, loaded, capsys):
    target = tmp_path / "made-by-cli"
    cli.main(["make-tiny", str(target)])
    assert str(target) in capsys.readouterr().out
    made = load_flux_pipeline(str(target), CPU, torch.float32)
    # Deterministic weights: the same checkpoint as the session's.
    assert state_dicts_equal(made.transformer, loaded.transformer)
    assert state_dicts_equal(made.vae, loaded.vae)


def test_model_tiny_writes_once_and_reuses(tmp_path):
    cache = tmp_path / "cache" / "tiny-flux"
    source = model_source("tiny", cache)
    assert Path(source) == cache and tiny_checkpoint_is_complete(cache)
    weights = cache / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat()
    assert model_source("tiny", cache) == source
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not cache.with_name("tiny-flux.partial").exists()
    assert load_flux_pipeline(source, CPU, torch.float32).vae_scale_factor == 8


def test_model_tiny_rebuilds_an_incomplete_cache(tmp_path):
    cache = tmp_path / "tiny-flux"
    cache.mkdir()
    (cache / "leftover.txt").write_text("an interrupted earlier write")
    model_source("tiny", cache)
    assert tiny_checkpoint_is_complete(cache)
    assert not (cache / "leftover.txt").exists()


def test_model_other_than_tiny_passes_through(tmp_path):
    assert model_source("/models/FLUX.1-dev", tmp_path) == "/models/FLUX.1-dev"
    assert model_source("black-forest-labs/FLUX.1-dev", tmp_path) == "black-forest-labs/FLUX.1-dev"
    assert not any(tmp_path.iterdir())


# --- `octoflux serve` flags and OCTOFLUX_* variables ---------------------------------------------


@pytest.fixture
def served(monkeypatch):
    """Run `octoflux serve ...` up to the point where it would start, returning its Settings."""
    for name in ("MODEL", "HOST", "PORT", "DEVICE", "DTYPE", "API_KEYS", "ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(f"OCTOFLUX_{name}", raising=False)
    captured = []
    monkeypatch.setattr(cli, "serve", captured.append)

    def run(*argv: str):
        cli.main(["serve", *argv])
        (settings,) = captured
        captured.clear()
        return settings

    return run


def test_serve_defaults(served):
    settings = served()
    assert (settings.model, settings.host, settings.port) == ("tiny", "127.0.0.1", 8000)
    assert (settings.device, settings.dtype, settings.api_key_list) == ("auto", "auto", [])
    assert settings.max_body_mb == 64 and settings.max_queue == 32
    assert settings.allow_unauthenticated is False and settings.warmup is True


def test_env_var_is_used_when_no_flag_is_given(served, monkeypatch):
    monkeypatch.setenv("OCTOFLUX_MODEL", "/models/FLUX.1-dev")
    monkeypatch.setenv("OCTOFLUX_PORT", "9100")
    monkeypatch.setenv("OCTOFLUX_DEVICE", "cpu")
    monkeypatch.setenv("OCTOFLUX_API_KEYS", "a,b")
    monkeypatch.setenv("OCTOFLUX_ALLOW_UNAUTHENTICATED", "true")
    monkeypatch.setenv("OCTOFLUX_MAX_QUEUE", "5")
    settings = served()
    assert (settings.model, settings.port, settings.device) == ("/models/FLUX.1-dev", 9100, "cpu")
    assert settings.api_key_list == ["a", "b"]
    assert settings.allow_unauthenticated is True
    assert settings.max_queue == 5


def test_flag_wins_over_env_var(served, monkeypatch):
    monkeypatch.setenv("OCTOFLUX_MODEL", "/env/model")
    monkeypatch.setenv("OCTOFLUX_PORT", "9100")
    monkeypatch.setenv("OCTOFLUX_DTYPE", "bfloat16")
    monkeypatch.setenv("OCTOFLUX_HOST", "0.0.0.0")
    monkeypatch.setenv("OCTOFLUX_WARMUP", "true")
    settings = served(
        "--model", "/flag/model", "--port", "9200", "--dtype", "float16", "--host", "127.0.0.1", "--no-warmup"
    )
    assert (settings.model, settings.port, settings.dtype) == ("/flag/model", 9200, "float16")
    assert settings.host == "127.0.0.1"
    assert settings.warmup is False


def test_every_flag_is_accepted(served, tmp_path):
    settings = served(
        "--model", "tiny", "--host", "::1", "--port", "1234", "--device", "cpu", "--dtype", "float32",
        "--api-keys", "x,y", "--allow-unauthenticated", "--max-body-mb", "8", "--max-queue", "3",
        "--max-batch", "2", "--tiny-dir", str(tmp_path), "--no-warmup",
    )  # fmt: skip
    assert settings.port == 1234 and settings.api_key_list == ["x", "y"]
    assert settings.allow_unauthenticated is True and settings.max_body_mb == 8
    assert (settings.max_queue, settings.max_batch, settings.tiny_dir) == (3, 2, tmp_path)


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--dtype", "int8"], ["--port", "eighty"]])
def test_invalid_flag_values_are_rejected(served, argv):
    with pytest.raises(SystemExit):
        served(*argv)
