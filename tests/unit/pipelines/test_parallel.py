"""Context parallelism on the transformer alone: layouts, and 2 gloo ranks against one process.

The two-rank checks run in one spawn of two processes (a process group cannot be joined twice in
pytest's own process); each rank records what it saw in a file the test reads.
"""

from __future__ import annotations

import json
import os
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers.services import free_port

from octoflux.pipelines import compat
from octoflux.pipelines.parallel import (
    LayoutError,
    ParallelLayout,
    check_layout,
    enable_context_parallel,
    init_ranks,
    parse_layout,
)

COLLECTIVE_TIMEOUT_S = 2
VERSIONS = f"diffusers {version('diffusers')}, torch {version('torch')}"


def test_layout_flag_forms():
    assert parse_layout("1") is None
    assert parse_layout("2") == ParallelLayout(ulysses=2)
    assert parse_layout("ring=2,ulysses=4") == ParallelLayout(ulysses=4, ring=2)
    assert parse_layout("ulysses=3").world == 3
    assert ParallelLayout(ulysses=4, ring=2).describe() == "ring=2,ulysses=4"
    for bad in ("0", "two", "ring=2,heads=2", "ulysses=-1"):
        with pytest.raises(ValueError, match="context-parallel must be"):
            parse_layout(bad)


def test_a_degree_that_does_not_divide_the_heads_names_the_valid_ones():
    with pytest.raises(
        LayoutError,
        match="ulysses=5 does not divide the model's 24 attention heads; valid: 2, 3, 4, 6, 8, 12, 24",
    ):
        check_layout(ParallelLayout(ulysses=5), heads=24, device_type="cuda", gpus=8)
    check_layout(ParallelLayout(ulysses=2), heads=2, device_type="cpu", gpus=0)


def test_more_ranks_than_gpus_and_ring_on_the_cpu_are_refused():
    with pytest.raises(LayoutError, match="needs 4 GPUs; 2 visible"):
        check_layout(ParallelLayout(ulysses=4), heads=24, device_type="cuda", gpus=2)
    with pytest.raises(LayoutError, match="ulysses only"):
        check_layout(ParallelLayout(ring=2), heads=2, device_type="cpu", gpus=0)


def _transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return transformer


def _add_lora_on_proj_out(transformer):
    """What hot-swap slots and trainers' `final_layer` LoRAs wrap; added after the parallel hooks, as the
    server's LoRA cache does."""
    from peft import LoraConfig

    torch.manual_seed(5)
    transformer.add_adapter(LoraConfig(r=4, target_modules=["proj_out", "to_q"], init_lora_weights=False))
    return transformer


def _inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    image_tokens, text_tokens = 64, 16
    img_ids = torch.zeros(image_tokens, 3)
    img_ids[:, 1] = torch.arange(image_tokens) // 8
    img_ids[:, 2] = torch.arange(image_tokens) % 8
    return dict(
        hidden_states=torch.randn(1, image_tokens, 64, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=generator),
        pooled_projections=torch.randn(1, 32, generator=generator),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_tokens, 3),
    )


def _rank(rank: int, port: int, out: str) -> None:
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    init_ranks(rank, 2, "127.0.0.1", port, "cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    seen: dict = {}
    raw = _transformer()
    try:  # diffusers alone, without the shim
        raw.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        seen["raw_enable"] = "ok"
    except Exception as exc:
        seen["raw_enable"] = type(exc).__name__
    transformer = _transformer()
    if rank == 1:  # a rank that loads slower than the collective timeout must still be waited for
        time.sleep(COLLECTIVE_TIMEOUT_S + 1)
    enable_context_parallel(transformer, ParallelLayout(ulysses=2))
    with torch.inference_mode():
        output = compat.transformer_forward(transformer, **_inputs())
        try:
            transformer(**_inputs(), return_dict=True)
            seen["dict_output"] = "ok"
        except Exception as exc:
            seen["dict_output"] = type(exc).__name__
    with_lora = _transformer()
    enable_context_parallel(with_lora, ParallelLayout(ulysses=2))
    _add_lora_on_proj_out(with_lora)
    with torch.inference_mode():
        output_with_lora = compat.transformer_forward(with_lora, **_inputs())
    if rank == 0:  # plain copies: a gathered output is a functional-collectives tensor subclass
        torch.save(torch.zeros(output.shape).copy_(output), Path(out) / "output.pt")
        torch.save(torch.zeros(output.shape).copy_(output_with_lora), Path(out) / "output_lora.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    return out


@pytest.mark.skipif(torch.accelerator.device_count() > 0, reason="the shim matters without an accelerator")
def test_enable_parallelism_needs_the_device_count_shim_without_an_accelerator(two_ranks):
    seen = json.loads((two_ranks / "rank0.json").read_text())
    # When this fails, diffusers no longer divides by the device count: compat.enable_parallelism can go.
    assert seen["raw_enable"] == "ZeroDivisionError", (
        f"diffusers' _resolve_parallel_config changed ({VERSIONS})"
    )


def test_parallel_hooks_need_return_dict_false(two_ranks):
    seen = json.loads((two_ranks / "rank1.json").read_text())
    # When this passes through, dict outputs are gathered too and compat.transformer_forward is merely tidy.
    assert seen["dict_output"] != "ok", f"diffusers' context-parallel output hook changed ({VERSIONS})"


def test_two_gloo_ranks_give_the_single_process_output(two_ranks):
    with torch.inference_mode():
        alone = compat.transformer_forward(_transformer(), **_inputs())
    split = torch.load(two_ranks / "output.pt")
    assert split.shape == alone.shape
    assert (split - alone).abs().max().item() < 1e-5
    assert os.path.exists(two_ranks / "rank1.json")


def test_a_lora_on_proj_out_gives_the_single_process_output(two_ranks):
    with torch.inference_mode():
        alone = compat.transformer_forward(_add_lora_on_proj_out(_transformer()), **_inputs())
        plain = compat.transformer_forward(_transformer(), **_inputs())
    assert (alone - plain).abs().max().item() > 1e-3  # the adapter changes the output
    split = torch.load(two_ranks / "output_lora.pt")
    assert (split - alone).abs().max().item() < 1e-5


def test_flux_plan_gathers_after_norm_out():
    from diffusers.models._modeling_parallel import ContextParallelOutput

    plan = compat.flux_plan_gathering_before_proj_out(_transformer())
    assert "proj_out" not in plan and isinstance(plan["norm_out"], ContextParallelOutput)
    assert set(plan[""]) == {"hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"}


def test_a_rank_that_does_not_decode_runs_every_step_and_never_touches_the_vae(load_tiny, monkeypatch):
    from octoflux.pipelines.engine import Engine, GenerationSpec

    engine = Engine(load_tiny())
    decoded: list[torch.Size] = []
    decode = engine.pipe.vae.decode
    monkeypatch.setattr(engine.pipe.vae, "decode", lambda z, **kw: decoded.append(z.shape) or decode(z, **kw))
    steps: list[int] = []
    spec = GenerationSpec(prompt="a fox", width=256, height=256, steps=3, guidance=3.5, seeds=[1, 2])

    result = engine.generate(spec, on_step=lambda event: steps.append(event.step), decode=False)
    assert (result.images, steps, decoded) == ([], [1, 2, 3], [])
    assert len(engine.generate(spec).images) == 2 and len(decoded) == 1  # the spy sees a decode


def test_ranks_after_the_first_run_each_job_without_decoding_until_told_to_stop():
    import pickle

    from octoflux.deploy.context_parallel import JOB_KEY
    from octoflux.deploy.rank_follower import follow
    from octoflux.pipelines.engine import GenerationSpec
    from octoflux.pipelines.model_set import ModelSet

    class Store:
        jobs = [GenerationSpec("a", 64, 64, 1, 3.5, [1], model="flux-schnell"), None]

        def wait(self, keys, timeout) -> None:
            pass

        def get(self, key: str) -> bytes:
            return pickle.dumps(self.jobs[int(key.removeprefix(JOB_KEY.format("")))])

    class Model:
        def __init__(self):
            self.calls: list[dict] = []

        def generate(self, spec, **kwargs):
            self.calls.append({"prompt": spec.prompt, "decode": kwargs.get("decode", True)})

    dev, schnell = Model(), Model()
    follow(ModelSet({"flux-dev": dev, "flux-schnell": schnell}), Store(), None, os.getppid())
    assert (dev.calls, schnell.calls) == ([], [{"prompt": "a", "decode": False}])


def test_ranks_after_the_first_load_no_safety_checker(tmp_path):
    from octoflux.deploy.context_parallel import RankStart, rank_settings
    from octoflux.deploy.rank_follower import follower_settings
    from octoflux.settings import Settings

    settings = Settings(device="cpu", safety_checker=tmp_path, context_parallel="2", state_dir=tmp_path)
    follower = follower_settings(RankStart(settings, rank=1, world=2, store_port=1, parent_pid=1))
    assert follower.safety_checker is None and follower.model == settings.model
    assert rank_settings(settings, 0).safety_checker == tmp_path  # rank 0 screens
