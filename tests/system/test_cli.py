"""`octoflux serve`'s command line is derived from Settings: every field a flag and a variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from helpers.services import free_port

from octoflux import cli
from octoflux.cli import OTHER_GROUP
from octoflux.settings import GROUPS, Settings

ROOT = Path(__file__).resolve().parents[2]

# A value for each field that differs from its default, as a flag argument and as the parsed value.
SAMPLES = {
    str: ("changed-text", "changed-text"),
    int: ("7", 7),
    float: ("7.5", 7.5),
    Path: ("/tmp/changed", Path("/tmp/changed")),
}


SAMPLE_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="


def sample(name: str):
    field = Settings.model_fields[name]
    annotation = field.annotation
    choices = get_args(annotation)
    if annotation is bool:
        return None, not field.default
    if get_origin(annotation) is Literal:  # another choice
        other = next(c for c in choices if c != field.default)
        return str(other), other
    if name == "warmup_sizes":
        return "768x1344", "768x1344"
    if name == "host":
        return "::1", "::1"
    if name == "webhook_secret":
        return SAMPLE_SECRET, SAMPLE_SECRET
    if name == "replicas":
        return "auto", "auto"
    if name == "context_parallel":
        return "ring=2,ulysses=4", "ring=2,ulysses=4"
    if name == "warmup_batches":
        return "1,2", "1,2"
    if name in ("state_url",):
        return "redis://127.0.0.1:6399/0", "redis://127.0.0.1:6399/0"
    for kind, value in SAMPLES.items():
        if annotation == kind or kind in choices:
            return value
    raise AssertionError(f"no sample value for {name}: {annotation}; add its type to SAMPLES")


def flag(name: str) -> str:
    field = Settings.model_fields[name]
    if field.annotation is bool:
        return f"--no-{name.replace('_', '-')}" if field.default else f"--{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')}"


@pytest.fixture
def served(monkeypatch):
    """Parse `octoflux serve ARGS` up to the point where it would start; return its Settings."""
    for name in os.environ:
        if name.startswith("OCTOFLUX_"):
            monkeypatch.delenv(name)
    captured: list[Settings] = []
    monkeypatch.setattr(cli, "serve", captured.append)

    def run(*argv: str) -> Settings:
        cli.main(["serve", *argv])
        return captured.pop()

    return run


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_field_has_a_description_a_flag_and_a_variable(name, served, monkeypatch):
    field = Settings.model_fields[name]
    assert field.description, f"{name} has no description (it becomes the flag's --help)"
    text, value = sample(name)
    argv = [flag(name)] if text is None else [flag(name), text]
    assert getattr(served(*argv), name) == value
    monkeypatch.setenv(f"OCTOFLUX_{name.upper()}", "true" if text is None else text)
    expected_from_env = True if text is None else value
    assert getattr(served(), name) == expected_from_env


def test_flag_beats_variable_beats_default(served, monkeypatch):
    assert served().max_queue == 32
    monkeypatch.setenv("OCTOFLUX_MAX_QUEUE", "5")
    assert served().max_queue == 5
    assert served("--max-queue", "9").max_queue == 9
    monkeypatch.setenv("OCTOFLUX_WARMUP", "true")
    assert served("--no-warmup").warmup is False
    monkeypatch.setenv("OCTOFLUX_ALLOW_UNAUTHENTICATED", "false")
    assert served("--allow-unauthenticated").allow_unauthenticated is True


def test_a_bad_value_is_a_usage_error_naming_flag_and_variable(served, capsys):
    with pytest.raises(SystemExit) as caught:
        served("--max-queue", "lots")
    assert caught.value.code == 2
    assert "--max-queue (or OCTOFLUX_MAX_QUEUE) 'lots'" in capsys.readouterr().err


def help_text() -> str:
    parser, _ = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    return serve.format_help()


def test_help_lists_the_groups_in_order_with_each_flag_under_its_group():
    text = help_text()
    positions = [text.index(f"\n{title}:\n") for title in GROUPS.values()]
    assert positions == sorted(positions)
    titles = [*GROUPS.values(), OTHER_GROUP]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        group = GROUPS.get(extra.get("group"), OTHER_GROUP)  # a field without a group is still a flag
        section = text[text.index(f"\n{group}:\n") :]
        following = [t for t in titles if t != group and f"\n{t}:\n" in section]
        end = min((section.index(f"\n{t}:\n") for t in following), default=len(section))
        assert flag(name) in section[:end], f"{flag(name)} is not under {group!r}"
    assert "{none,fp8,int8,nf4}" in text  # choices come from the Literal type
    assert "(default: 32)" in text


def test_help_is_readable_from_the_shell():
    done = subprocess.run(
        [sys.executable, "-m", "octoflux.cli", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: octoflux serve [--FLAG VALUE ...]")
    assert max(len(line) for line in done.stdout.splitlines()) <= 100


def run_serve(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "octoflux.cli", "serve", "--device", "cpu", *argv]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ("/path/with/a/typo", "--model /path/with/a/typo: no such file or folder"),
        ("nobody-owns/this-model", "--model nobody-owns/this-model: not in the local HF cache"),
        ("tests", "--model tests: no model_index.json in that folder"),
    ],
)
def test_a_model_that_is_not_there_fails_at_startup_in_one_line(model, said):
    done = run_serve("--model", model)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"octoflux: {said}" + done.stderr.strip().split(said, 1)[1]]
    assert "Traceback" not in done.stderr


def test_a_model_that_is_not_there_is_refused_before_torch_or_diffusers_load(tmp_path):
    code = (
        "import sys\n"
        "from octoflux.cli import main\n"
        "try:\n"
        f"    main(['serve', '--model', '/path/with/a/typo', '--state-dir', {str(tmp_path)!r}])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
        "loaded = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.strip() == "octoflux: --model /path/with/a/typo: no such file or folder"


def test_random_full_on_a_small_cpu_is_refused_before_loading():
    # float32 FLUX.1-dev is over 60 GB of weights: more than any test machine has free.
    done = run_serve("--model", "random-full", "--dtype", "float32")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("octoflux: the model will not fit:") and "--dtype bfloat16" in line


def test_a_folder_missing_flux_parts_fails_at_startup(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (tmp_path / "vae").mkdir()
    done = run_serve("--model", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"octoflux: --model {tmp_path}: a FLUX folder needs scheduler, text_encoder, text_encoder_2, "
        "tokenizer, tokenizer_2, transformer subfolders there"
    )


def test_a_model_that_fails_to_load_after_the_checks_stops_the_server(tmp_path, tiny_checkpoint):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "vae" / "config.json").write_text("not json")
    done = run_serve("--model", str(broken), "--port", str(free_port()))
    assert done.returncode == 1
    assert "model load failed" in done.stderr.splitlines()[-1]
