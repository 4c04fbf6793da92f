"""`octoflux serve --transformer FILE` refuses a bad file before loading, in one line, exit 2;
`octoflux export-transformer` writes the files it serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from octoflux import cli
from octoflux.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def q8_file(tiny_checkpoint, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("files") / "tiny-Q8_0.gguf"
    cli.main(
        ["export-transformer", tiny_checkpoint, str(target), "--format", "gguf:Q8_0", "--layout", "comfy"]
    )
    return target


@pytest.fixture(scope="module")
def bf16_file(tiny_checkpoint, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("files") / "tiny-bf16.safetensors"
    cli.main(["export-transformer", tiny_checkpoint, str(target), "--format", "bf16"])
    return target


def refusal(tiny_checkpoint, transformer: Path, capsys, **settings) -> str:
    """What `serve`'s preflight prints before refusing: one line on stderr, exit code 2."""
    with pytest.raises(SystemExit) as caught:
        cli.preflight(Settings(model=tiny_checkpoint, transformer=str(transformer), device="cpu", **settings))
    assert caught.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_a_truncated_file_stops_serve_in_one_line_with_exit_2(tiny_checkpoint, q8_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(q8_file.read_bytes()[:4000])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--device", "cpu", "--model", tiny_checkpoint]
    done = subprocess.run(
        [*command, "--transformer", str(cut)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"octoflux: --transformer {cut}: not a readable GGUF file (4000 bytes; truncated")


def test_a_gguf_of_another_architecture_is_refused(tiny_checkpoint, tmp_path, capsys):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "llm.gguf", arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert refusal(tiny_checkpoint, tmp_path / "llm.gguf", capsys) == (
        f"octoflux: --transformer {tmp_path / 'llm.gguf'}: "
        "a GGUF of architecture 'llama', not a FLUX.1 transformer"
    )


def test_a_file_not_matching_the_base_config_is_refused(tiny_checkpoint, bf16_file, tmp_path, capsys):
    state = load_file(bf16_file)
    state["final_layer.linear.weight"] = torch.zeros(48, 32, dtype=torch.bfloat16)
    save_file(state, tmp_path / "other.safetensors")
    line = refusal(tiny_checkpoint, tmp_path / "other.safetensors", capsys)
    assert line == (
        f"octoflux: --transformer {tmp_path / 'other.safetensors'}: does not match --model "
        f"{tiny_checkpoint}'s transformer config: proj_out.weight is 48x32 in the file, 64x32 in the base"
    )


def test_a_kontext_file_on_a_dev_base_is_refused(tiny_checkpoint, bf16_file, tmp_path, capsys):
    kontext = tmp_path / "flux1-kontext-dev-Q8_0.safetensors"
    kontext.write_bytes(bf16_file.read_bytes())
    assert refusal(tiny_checkpoint, kontext, capsys) == (
        f"octoflux: --transformer {kontext}: a FLUX.1 Kontext transformer, but --model {tiny_checkpoint} "
        "is FLUX.1-dev's config; use a base of the same family"
    )


def test_a_single_file_model_cannot_take_a_transformer_file(q8_file, bf16_file, capsys):
    line = refusal(str(bf16_file), q8_file, capsys)
    assert line == (
        "octoflux: --transformer needs --model to be a diffusers-format folder or hub id, "
        f"not {str(bf16_file)!r}"
    )


def test_a_good_file_passes_the_preflight(tiny_checkpoint, q8_file, capsys):
    cli.preflight(Settings(model=tiny_checkpoint, transformer=str(q8_file), device="cpu", offload="group"))
    assert capsys.readouterr().err == ""


def test_export_refuses_a_format_its_name_does_not_fit(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(
            ["export-transformer", tiny_checkpoint, str(tmp_path / "x.safetensors"), "--format", "gguf:Q4_0"]
        )
    assert caught.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"octoflux: {tmp_path / 'x.safetensors'}: a GGUF file's name ends in .gguf"
    )


@pytest.fixture(scope="module")
def t5_fp8_file(tiny_checkpoint, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("files") / "tiny-t5-fp8.safetensors"
    cli.main(["export-text-encoder", tiny_checkpoint, str(target), "--format", "fp8"])
    return target


def serve_preflight(argv: list[str]) -> None:
    """`octoflux serve ARGV` up to the model checks (flags parsed as the command line parses them)."""
    parser, source = cli.build_parser()
    cli.preflight(cli.settings_from_args(source, parser.parse_args(["serve", "--device", "cpu", *argv])))


def test_an_exported_t5_file_passes_the_preflight_beside_a_transformer_file(
    tiny_checkpoint, q8_file, t5_fp8_file, capsys
):
    serve_preflight(
        ["--model", tiny_checkpoint, "--transformer", str(q8_file), "--text-encoder-2", str(t5_fp8_file)]
    )
    assert capsys.readouterr().err == ""


def test_a_t5_file_not_matching_the_base_config_stops_serve_in_one_line(
    tiny_checkpoint, t5_fp8_file, tmp_path, capsys
):
    state = load_file(t5_fp8_file)
    del state["encoder.final_layer_norm.weight"]
    save_file(state, tmp_path / "t5.safetensors")
    with pytest.raises(SystemExit) as caught:
        serve_preflight(["--model", tiny_checkpoint, "--text-encoder-2", str(tmp_path / "t5.safetensors")])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"octoflux: --text-encoder-2 {tmp_path / 't5.safetensors'}: does not match --model "
        f"{tiny_checkpoint}'s T5 config: encoder.final_layer_norm.weight is missing"
    )


def test_an_unreadable_t5_file_stops_serve_in_one_line(tiny_checkpoint, t5_fp8_file, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(t5_fp8_file.read_bytes()[:-100])
    with pytest.raises(SystemExit) as caught:
        serve_preflight(["--model", tiny_checkpoint, "--text-encoder-2", str(cut)])
    assert caught.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"octoflux: --text-encoder-2 {cut}: truncated (")
