"""Load each distinct text encoder, tokenizer and VAE once when several models are served.

FLUX.1's variants (dev, schnell, Kontext, Fill) ship the same CLIP-L, T5-XXL, tokenizers and VAE.
"Same" is verified, never assumed: every file of the component's folder has the same name, size and
SHA-256. Sizes are compared first, so a differing component costs no hashing; hashes are computed once
per folder (a 9.5 GB T5 takes a few seconds, while its files are in the page cache from loading).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SHAREABLE = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
HASH_CHUNK = 16 * 2**20


def component_folder(source: str, component: str) -> Path | None:
    """The local folder of one component of a diffusers folder or a hub id in the local cache."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        sub = folder / component
        return sub if sub.is_dir() else None
    if folder.exists() or source.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(source, allow_patterns=[f"{component}/*", "model_index.json"])
    except Exception as exc:  # offline and not cached, or no such repo: loaded unshared
        log.debug("cannot compare %s of %s: %s", component, source, exc)
        return None
    sub = Path(snapshot) / component
    return sub if sub.is_dir() else None


@dataclass
class Fingerprint:
    """What a component's folder holds: file names and sizes, and their hashes once asked for."""

    folder: Path
    sizes: tuple[tuple[str, int], ...]
    _digests: tuple[str, ...] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, folder: Path) -> Fingerprint:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return cls(folder, tuple((str(p.relative_to(folder)), p.stat().st_size) for p in files))

    @property
    def digests(self) -> tuple[str, ...]:
        if self._digests is None:
            started = time.perf_counter()
            self._digests = tuple(_sha256(self.folder / name) for name, _ in self.sizes)
            total = sum(size for _, size in self.sizes)
            log.debug(
                "hashed %s (%.2f GB) in %.1f s", self.folder, total / 2**30, time.perf_counter() - started
            )
        return self._digests

    def same_as(self, other: Fingerprint) -> bool:
        return self.sizes == other.sizes and self.digests == other.digests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Loaded:
    model_id: str
    component: str
    fingerprint: Fingerprint
    module: object


class SharedComponents:
    """The components loaded so far; `reusable(source)` gives those another model may take as they are."""

    def __init__(self) -> None:
        self._loaded: list[Loaded] = []
        # model id -> component -> the model id whose object it uses
        self.shared_with: dict[str, dict[str, str]] = {}

    def reusable(self, source: str, components: tuple[str, ...] = SHAREABLE) -> tuple[dict, dict]:
        """(objects to pass to `from_pretrained`, {component: model id it comes from}) for `source`."""
        given: dict[str, object] = {}
        owners: dict[str, str] = {}
        for component in components:
            folder = component_folder(source, component)
            if folder is None:
                continue
            mine = Fingerprint.of(folder)
            for loaded in self._loaded:
                if loaded.component == component and mine.same_as(loaded.fingerprint):
                    given[component], owners[component] = loaded.module, loaded.model_id
                    break
        return given, owners

    def remember(self, model_id: str, source: str, pipe, owners: dict[str, str]) -> None:
        """Note the components `model_id` loaded itself, so later models may share them."""
        self.shared_with[model_id] = dict(owners)
        for component in SHAREABLE:
            if component in owners or getattr(pipe, component, None) is None:
                continue
            folder = component_folder(source, component)
            if folder is not None:
                self._loaded.append(
                    Loaded(model_id, component, Fingerprint.of(folder), getattr(pipe, component))
                )
