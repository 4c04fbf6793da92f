"""Several models in one process: `--model` lists, components loaded once only when verified the same,
memory counted once, and a Kontext transformer file beside its base folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gradient_image, pixels
from safetensors.torch import load_file, save_file

from octoflux import cli
from octoflux.core.engine_factory import build_models
from octoflux.core.request import ImageRequest
from octoflux.core.spec import build_spec
from octoflux.pipelines.export import export_transformer
from octoflux.pipelines.family import FAMILIES, FLUX_DEV, FLUX_FILL_DEV, FLUX_KONTEXT_DEV, FLUX_SCHNELL
from octoflux.pipelines.loader import model_source
from octoflux.pipelines.memory import count_model_set, count_weights
from octoflux.pipelines.model_list import ModelEntry, ModelListError, parse_model_list
from octoflux.pipelines.model_set import distinct_tensor_bytes as storage_bytes
from octoflux.settings import Settings

SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-set") / "tiny-flux"


@pytest.fixture(scope="module")
def sources(tiny_dir) -> dict[str, str]:
    """The four tiny checkpoints, by model id, written as `--model tiny-family` writes them."""
    names = {
        FLUX_DEV: "tiny",
        FLUX_SCHNELL: "tiny-schnell",
        FLUX_KONTEXT_DEV: "tiny-kontext",
        FLUX_FILL_DEV: "tiny-fill",
    }
    return {model_id: model_source(name, tiny_dir) for model_id, name in names.items()}


@pytest.fixture(scope="module")
def family(tiny_dir):
    return build_models(Settings(model="tiny-family", tiny_dir=tiny_dir, device="cpu"))


def settings_for(*entries: str, **extra) -> Settings:
    return Settings(model=",".join(entries), device="cpu", **extra)


def test_model_lists_parse_ids_sources_and_transformer_files():
    assert parse_model_list("/m/FLUX.1-dev") == [ModelEntry(None, "/m/FLUX.1-dev")]
    assert parse_model_list("flux-dev=/m/dev, flux-kontext-dev=/m/kontext+/m/k-Q8_0.gguf") == [
        ModelEntry(FLUX_DEV, "/m/dev"),
        ModelEntry(FLUX_KONTEXT_DEV, "/m/kontext", "/m/k-Q8_0.gguf"),
    ]
    assert [e.id for e in parse_model_list("tiny-family")] == [
        FLUX_DEV,
        FLUX_SCHNELL,
        FLUX_KONTEXT_DEV,
        FLUX_FILL_DEV,
    ]


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("flux-dev=/a,flux-dev=/b", "--model names flux-dev twice"),
        ("flux-pro=/a", "unknown model id 'flux-pro'"),
        ("flux-dev=/a,,flux-fill-dev=/b", "empty entry"),
        ("flux-dev=/a+", "expected ID=SOURCE or ID=BASE+TRANSFORMER_FILE"),
    ],
)
def test_bad_model_lists_are_one_line_errors(value, said):
    with pytest.raises(ModelListError, match=re.escape(said)):
        parse_model_list(value)


def test_an_id_the_checkpoint_contradicts_is_a_one_line_startup_error(sources, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(
            [
                "serve",
                "--device",
                "cpu",
                "--model",
                f"flux-dev={sources[FLUX_DEV]},flux-dev={sources[FLUX_KONTEXT_DEV]}",
            ]
        )
    assert caught.value.code == 2
    # argparse's usage line, then the one line saying what is wrong.
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith("--model names flux-dev twice; serve each model once")
    with pytest.raises(Exception, match=f"that checkpoint is {FLUX_KONTEXT_DEV}, not {FLUX_DEV}"):
        build_models(settings_for(f"flux-dev={sources[FLUX_KONTEXT_DEV]}"))


def test_every_model_of_the_family_shares_one_copy_of_each_encoder(family):
    pipes = [engine.pipe for engine in family.engines.values()]
    assert list(family.engines) == [FLUX_DEV, FLUX_SCHNELL, FLUX_KONTEXT_DEV, FLUX_FILL_DEV]
    for component in SHARED:
        assert len({id(getattr(pipe, component)) for pipe in pipes}) == 1, component
    # In memory: the tensors held are one set of encoders and VAE plus four transformers.
    held = [
        getattr(pipe, c) for pipe in pipes for c in ("transformer", "text_encoder", "text_encoder_2", "vae")
    ]
    dev = pipes[0]
    expected = [pipe.transformer for pipe in pipes] + [dev.text_encoder, dev.text_encoder_2, dev.vae]
    assert storage_bytes(held) == storage_bytes(expected)
    copies = sum(
        storage_bytes([getattr(pipe, c) for c in ("transformer", "text_encoder", "text_encoder_2", "vae")])
        for pipe in pipes
    )
    assert copies - storage_bytes(held) == 3 * storage_bytes([dev.text_encoder, dev.text_encoder_2, dev.vae])


def test_a_text_encoder_with_other_weights_of_the_same_size_is_not_shared(sources, tmp_path):
    changed = tmp_path / "kontext-own-clip"
    shutil.copytree(sources[FLUX_KONTEXT_DEV], changed)
    weights = next((changed / "text_encoder").glob("*.safetensors"))
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1.0  # same names, shapes and file size; other values
    save_file(state, weights, metadata={"format": "pt"})
    models = build_models(settings_for(f"flux-dev={sources[FLUX_DEV]}", f"flux-kontext-dev={changed}"))
    dev, kontext = models.engines[FLUX_DEV].pipe, models.engines[FLUX_KONTEXT_DEV].pipe
    assert kontext.text_encoder is not dev.text_encoder
    assert torch.equal(kontext.text_encoder.state_dict()[name], state[name])
    assert kontext.text_encoder_2 is dev.text_encoder_2 and kontext.vae is dev.vae
    assert models.shared_with[FLUX_KONTEXT_DEV] == {c: FLUX_DEV for c in SHARED if c != "text_encoder"}


def test_the_memory_estimate_counts_shared_components_once(sources):
    models = [(model_id, source, "") for model_id, source in sources.items()]
    counted = count_model_set(models)
    singles = [count_weights(source) for source in sources.values()]
    encoders = sum(singles[0].float_elements[c] for c in ("text_encoder", "text_encoder_2", "vae"))
    assert counted.shared_elements == 3 * encoders
    assert (
        sum(counted.weights.float_elements.values())
        == sum(sum(w.float_elements.values()) for w in singles) - 3 * encoders
    )
    assert counted.describe().startswith("text_encoder, text_encoder_2, vae loaded once")


def test_a_kontext_transformer_file_beside_its_base_gives_the_folders_pixels(family, sources, tmp_path):
    kontext_folder = sources[FLUX_KONTEXT_DEV]
    exported = export_transformer(
        Path(kontext_folder), tmp_path / "kontext.safetensors", "bf16", layout="bfl"
    )
    settings = settings_for(
        f"flux-dev={sources[FLUX_DEV]}", f"flux-kontext-dev={kontext_folder}+{exported}", dtype="float32"
    )
    models = build_models(settings)
    spec = build_spec(
        ImageRequest(
            prompt="red", init_image=gradient_image(512, 512), width=512, height=512, steps=2, seed=3
        ),
        FAMILIES[FLUX_KONTEXT_DEV],
    )
    from_file = pixels(models.generate(spec).images[0])
    # The folder's transformer rounded to bf16, as the file stores it.
    folder = family.engines[FLUX_KONTEXT_DEV]
    original = {k: v.clone() for k, v in folder.pipe.transformer.state_dict().items()}
    try:
        with torch.no_grad():
            for value in folder.pipe.transformer.state_dict().values():
                value.copy_(value.to(torch.bfloat16).to(value.dtype))
        from_folder = pixels(family.generate(spec).images[0])
    finally:
        folder.pipe.transformer.load_state_dict(original)
    assert int(np.abs(from_file - from_folder).max()) <= 1, int(np.abs(from_file - from_folder).max())
    assert models.engines[FLUX_KONTEXT_DEV].pipe.text_encoder is models.engines[FLUX_DEV].pipe.text_encoder


@pytest.mark.parametrize(
    ("variant", "pipeline_class"), [("kontext", "FluxKontextPipeline"), ("fill", "FluxFillPipeline")]
)
def test_make_tiny_writes_kontext_and_fill(tmp_path, variant, pipeline_class):
    import json

    cli.main(["make-tiny", "--variant", variant, str(tmp_path / variant)])
    index = json.loads((tmp_path / variant / "model_index.json").read_text())
    config = json.loads((tmp_path / variant / "transformer" / "config.json").read_text())
    assert index["_class_name"] == pipeline_class
    assert config["in_channels"] == (384 if variant == "fill" else 64)
