"""The LoRA modules without a server: names, the folder, file checks, the cache's LRU and events."""

from __future__ import annotations

import json
import os

import pytest
import torch

from octoflux.pipelines.loras import (
    LoraCache,
    LoraInvalid,
    LoraLibrary,
    LoraNotFound,
    LoraStats,
    linear_shapes,
    lora_name,
    read_lora,
)
from octoflux.pipelines.tiny_lora import make_lora, save_diffusers, save_raw, sd_scripts_file

MB = 2**20


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def shapes(pipe):
    return linear_shapes(pipe)


# ---------------------------------------------------------------- names and the folder


@pytest.mark.parametrize(
    "ref, name", [("style", "style"), ("octoai:style", "style"), ("a:b:c.v2_x-y", "c.v2_x-y")]
)
def test_lora_name_drops_the_owner(ref, name):
    assert lora_name(ref) == name


@pytest.mark.parametrize("ref", ["", "../x", "a/b", "x y", "é", "owner:", "x" * 129])
def test_lora_name_refuses_anything_that_could_leave_the_folder_or_is_empty(ref):
    with pytest.raises(LoraInvalid, match="1-128 characters"):
        lora_name(ref)


def test_library_lists_only_well_named_safetensors_files(tmp_path):
    library = LoraLibrary(tmp_path / "new")  # created on demand
    for file in ("b.safetensors", "a.safetensors", "notes.txt", "bad name.safetensors"):
        (library.directory / file).write_bytes(b"x")
    (library.directory / "dir.safetensors").mkdir()
    assert library.names() == ["a", "b"]
    assert library.resolve("owner:a") == library.directory / "a.safetensors"
    with pytest.raises(LoraNotFound, match="no missing.safetensors"):
        library.resolve("missing")


# ---------------------------------------------------------------- one file


def test_linear_shapes_cover_transformer_and_clip_layers(shapes):
    assert shapes["transformer.transformer_blocks.0.attn.to_q"] == (32, 32)
    assert any(k.startswith("text_encoder.") and k.endswith("q_proj") for k in shapes)
    assert not any(".lora_" in k or "text_encoder_2" in k for k in shapes)


def test_read_lora_groups_tensors_per_component(tmp_path, shapes):
    path = save_diffusers(make_lora(1, rank=4, text_encoder=True), tmp_path / "x.safetensors")
    lora = read_lora(path, "x", shapes, MB)
    assert lora.components == ("transformer", "text_encoder") and lora.rank == 4
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in lora.tensors["transformer"])
    state, alphas, metadata = lora.prefixed("transformer")
    assert all(k.startswith("transformer.") for k in state) and alphas is None and metadata is None


def test_read_lora_splits_the_peft_metadata_per_component(tmp_path, shapes):
    from safetensors.torch import save_file

    config = {"transformer.r": 4, "transformer.lora_alpha": 8, "text_encoder.r": 2}
    path = tmp_path / "m.safetensors"
    save_file(make_lora(1), str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    lora = read_lora(path, "m", shapes, MB)
    assert lora.metadata == {"transformer": {"r": 4, "lora_alpha": 8}, "text_encoder": {"r": 2}}
    _, alphas, metadata = lora.prefixed("transformer")
    assert alphas is None and metadata == {"transformer.r": 4, "transformer.lora_alpha": 8}
    save_file(make_lora(1), str(path), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(LoraInvalid, match="is not JSON"):
        read_lora(path, "m", shapes, MB)


def refusal(tmp_path, shapes, tensors=None, raw: bytes | None = None, max_bytes: int = MB) -> str:
    path = tmp_path / "f.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_raw(tensors, path)
    with pytest.raises(LoraInvalid) as refused:
        read_lora(path, "f", shapes, max_bytes)
    return str(refused.value)


def test_read_lora_says_why_it_refuses_a_file(tmp_path, shapes):
    good = make_lora(2)
    q = "transformer.transformer_blocks.0.attn.to_q"
    assert "not a safetensors file" in refusal(tmp_path, shapes, raw=b"\x80\x04" + b"\x00" * 64)
    assert "limit is" in refusal(tmp_path, shapes, good, max_bytes=100)
    ints = {f"{q}.lora_A.weight": torch.zeros(4, 32, dtype=torch.int32)}
    assert "not floating point" in refusal(tmp_path, shapes, ints)
    wrong_shape = {**good, f"{q}.lora_A.weight": torch.zeros(4, 99)}
    assert "does not fit" in refusal(tmp_path, shapes, wrong_shape)
    no_layer = {**good, "transformer.nowhere.lora_A.weight": torch.zeros(4, 32)}
    no_layer["transformer.nowhere.lora_B.weight"] = torch.zeros(32, 4)
    assert "does not map onto any linear layer" in refusal(tmp_path, shapes, no_layer)
    half = {k: v for k, v in good.items() if k != f"{q}.lora_B.weight"}
    assert "has no lora_B" in refusal(tmp_path, shapes, half)
    ranks = {**good, f"{q}.lora_B.weight": torch.zeros(32, 3)}
    assert "rank 4 but lora_B 3" in refusal(tmp_path, shapes, ranks)
    assert "is not a LoRA weight" in refusal(tmp_path, shapes, {"transformer.x.weight": torch.zeros(2)})


def test_read_lora_leaves_out_and_logs_what_load_lora_weights_leaves_out(tmp_path, shapes, caplog):
    """CLIP attention keys beside MLP keys without out_proj, and sd-scripts' embedders (no
    `transformer.` prefix after diffusers' converter): plain diffusers loads neither."""
    state = sd_scripts_file(4, clip=("self_attn_q_proj", "mlp_fc1"), embedders=True)
    path = save_raw(state, tmp_path / "k.safetensors")
    with caplog.at_level("WARNING", logger="octoflux.pipelines.loras.files"):
        lora = read_lora(path, "k", shapes, MB)
    assert {k.rpartition(".lora_")[0].rpartition(".")[2] for k in lora.tensors["text_encoder"]} == {"fc1"}
    assert not any(
        k.startswith(("x_embedder.", "context_embedder.", "time_text_embed."))
        for k in lora.tensors["transformer"]
    )
    (record,) = [r for r in caplog.records if "leaves out" in r.getMessage()]
    message = record.getMessage()
    assert "'k'" in message and "text_encoder.text_model.encoder.layers.0.self_attn.to_q," in message
    assert "x_embedder" in message and "time_text_embed.timestep_embedder.linear_1" in message


def test_only_safetensors_suffix_is_read(tmp_path, shapes):
    path = tmp_path / "x.bin"
    path.write_bytes(b"")
    with pytest.raises(LoraInvalid, match="only .safetensors"):
        read_lora(path, "x", shapes, MB)


# ---------------------------------------------------------------- the cache


@pytest.fixture
def events():
    return []


@pytest.fixture
def cache(pipe, tmp_path, events):
    library = LoraLibrary(tmp_path)
    for i, name in enumerate(("a", "b", "c")):
        save_diffusers(make_lora(40 + i, text_encoder=name == "c"), library.path(name))
    cache = LoraCache(pipe, library, cache_size=2, on_event=lambda e, s: events.append((e, s)))
    yield cache
    for name in cache.resident:  # leave the shared pipeline without adapters
        cache.evict(name)


def names(events) -> list[str]:
    return [e for e, _ in events]


def test_cache_evicts_the_least_recently_used_and_reports_each_event(cache, events, pipe):
    cache.activate({"a": 1.0})
    assert names(events) == ["miss", "load", "switch"]
    assert all(s is not None and s >= 0 for e, s in events if e in ("load", "switch"))
    assert all(s is None for e, s in events if e in ("miss", "hit"))
    cache.activate({"b": 1.0})
    cache.activate({"a": 0.5})  # a is now the most recently used
    assert names(events)[-2:] == ["hit", "switch"]
    cache.activate({"c": 1.0})  # over capacity: b goes
    assert cache.resident == ["a", "c"] and "evict" in names(events)
    assert cache.stats.hits == 1 and cache.stats.misses == 3 and cache.stats.evictions == 1
    assert cache.stats.loads == 3 and cache.stats.switches == 4
    adapters = set(pipe.transformer.peft_config)
    assert not any(a.startswith("b__") for a in adapters) and len(adapters) == 2


def test_same_set_again_is_no_switch_and_weights_of_a_name_add_up(cache, events):
    cache.activate({"a": 0.5, "owner:a": 0.25})
    switches = cache.stats.switches
    cache.activate({"a": 0.75})
    assert cache.stats.switches == switches and names(events)[-1] == "hit"


def test_a_touched_file_is_a_hit_and_a_changed_file_is_reloaded(cache):
    path = cache.library.path("a")
    cache.activate({"a": 1.0})
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    cache.activate({"a": 1.0})
    assert cache.stats.loads == 1 and cache.stats.hits == 1
    save_diffusers(make_lora(99), path)
    cache.activate({"a": 1.0})
    assert cache.stats.loads == 2 and cache.stats.reloads == 1


def test_a_missing_file_is_lora_not_found_and_leaves_the_cache_as_it_was(cache):
    cache.activate({"a": 1.0})
    with pytest.raises(LoraNotFound, match="no nope.safetensors"):
        cache.activate({"nope": 1.0})
    assert cache.resident == ["a"]


def test_text_encoder_key_names_only_active_clip_loras(cache):
    cache.activate({"a": 1.0})
    assert cache.text_encoder_key == ()
    cache.activate({"a": 1.0, "c": 0.5})
    ((sha, weight),) = cache.text_encoder_key
    assert len(sha) == 64 and weight == 0.5


def test_stats_keep_the_last_fifty_events():
    stats = LoraStats()
    for i in range(60):
        stats.note(f"e{i}")
    assert len(stats.events) == 50 and stats.events[-1] == "e59"
