"""Whether `--model` names something there: a file, a diffusers folder with FLUX's parts, or a hub id in
the local cache. Torch-free, so that `octoflux serve` refuses a typo before the libraries load."""

from __future__ import annotations

from pathlib import Path

RANDOM_FULL = "random-full"
# The subfolders of a diffusers-format FLUX.1 checkpoint.
FLUX_COMPONENTS = (
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "transformer",
    "vae",
)


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded."""


class ModelNotFound(ModelLoadError):
    """`--model` names nothing loadable; the message is one line saying what was looked for where."""


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith((".safetensors", ".ckpt"))


def check_model_source(source: str) -> None:
    """Fail fast, before any loading, when `source` (from `model_source`) cannot be a FLUX checkpoint."""
    if source == RANDOM_FULL:
        return
    path = Path(source).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(
                f"--model {source}: no model_index.json in that folder (not a diffusers-format model)"
            )
        missing = [name for name in FLUX_COMPONENTS if not (path / name).is_dir()]
        if missing:
            raise ModelNotFound(
                f"--model {source}: a FLUX folder needs {', '.join(missing)} subfolders there"
            )
        return
    if looks_like_path(source) or source.count("/") != 1:
        hint = "" if looks_like_path(source) else " (nor 'tiny', 'random-full' or a hub id OWNER/NAME)"
        raise ModelNotFound(f"--model {source}: no such file or folder{hint}")
    _check_hub_cache(source)


def _check_hub_cache(repo_id: str) -> None:
    """A hub id: offline, its model_index.json must be in the local HF cache (online, it may download)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if not isinstance(cached, str):
        raise ModelNotFound(
            f"--model {repo_id}: not in the local HF cache ({constants.HF_HUB_CACHE}) "
            "and HF_HUB_OFFLINE is set, so it cannot be downloaded"
        )
