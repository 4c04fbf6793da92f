"""Who may call: named API keys with scopes and limits, from OCTOFLUX_API_KEYS and `--api-keys-file`.

A key's `owner` is the hex sha256 of its secret: it owns the key's async jobs and assets, so a key
moved from OCTOFLUX_API_KEYS into the file (or renamed there) keeps reading what it created, and the
file may hold the hash instead of the secret. The key's `name` labels its metrics and quotas.

The file is read again on SIGHUP (the CLI calls `reload`) and when its mtime or size changes
(checked at most once a second, on the next lookup); a file that no longer parses is logged and the
keys already loaded stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GENERATE, ASSETS, METRICS, ADMIN = "generate", "assets", "metrics", "admin"
SCOPES = (GENERATE, ASSETS, METRICS, ADMIN)
# What a key of OCTOFLUX_API_KEYS may do: its own generations and assets, and read /metrics.
ENV_KEY_SCOPES = frozenset({GENERATE, ASSETS, METRICS})
KEY_FIELDS = {"name", "secret", "secret_sha256", "scopes", "max_queued", "images_per_minute"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
POLL_EVERY_S = 1.0


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and what is wrong, on one line."""


@dataclass(frozen=True)
class Tenant:
    """One API key as the server knows it: never its secret."""

    name: str
    owner: str  # hex sha256 of the secret
    scopes: frozenset[str]
    max_queued: int | None = None
    images_per_minute: int | None = None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def asset_space(self) -> str | None:
        """Where this key's assets live: its own space, or the shared one (None) for an admin key."""
        return None if self.is_admin else self.owner

    def view(self) -> dict:
        """What the key's holder may read about it (the playground shows it)."""
        return {
            "name": self.name,
            "scopes": sorted(self.scopes),
            "max_queued": self.max_queued,
            "images_per_minute": self.images_per_minute,
        }


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def env_tenants(secrets: list[str]) -> list[Tenant]:
    """OCTOFLUX_API_KEYS: named `key-<first 8 hex of the hash>`, stable whatever the list's order."""
    return [Tenant(f"key-{secret_hash(s)[:8]}", secret_hash(s), ENV_KEY_SCOPES) for s in secrets]


def parse_keys_file(path: Path) -> list[Tenant]:
    """The `[[keys]]` of a TOML keys file; `KeysFileError` naming the file and the first problem."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"keys file {path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"keys file {path}: not valid TOML: {exc}") from None
    extra = set(raw) - {"keys"}
    if extra:
        raise KeysFileError(f"keys file {path}: unknown top-level field {sorted(extra)[0]!r}; only [[keys]]")
    entries = raw.get("keys", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise KeysFileError(f"keys file {path}: `keys` must be an array of tables ([[keys]])")
    tenants = [_tenant(entry, f"keys file {path}: key {i + 1}") for i, entry in enumerate(entries)]
    for field, what in (("name", "name"), ("owner", "secret")):
        seen: set[str] = set()
        for tenant in tenants:
            value = getattr(tenant, field)
            if value in seen:
                shown = f" {tenant.name!r}" if field == "name" else f" (key {tenant.name!r})"
                raise KeysFileError(f"keys file {path}: two keys have the same {what}{shown}")
            seen.add(value)
    return tenants


def _tenant(entry: dict, where: str) -> Tenant:
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeysFileError(f"{where}: `name` must be 1-64 characters from A-Z a-z 0-9 . _ -")
    where = f"{where} ({name!r})"
    extra = set(entry) - KEY_FIELDS
    if extra:
        raise KeysFileError(
            f"{where}: unknown field {sorted(extra)[0]!r} (allowed: {', '.join(sorted(KEY_FIELDS))})"
        )
    return Tenant(
        name=name,
        owner=_owner(entry, where),
        scopes=_scopes(entry.get("scopes"), where),
        max_queued=_limit(entry, "max_queued", where),
        images_per_minute=_limit(entry, "images_per_minute", where),
    )


def _owner(entry: dict, where: str) -> str:
    secret, digest = entry.get("secret"), entry.get("secret_sha256")
    if (secret is None) == (digest is None):
        raise KeysFileError(f"{where}: give exactly one of `secret` and `secret_sha256`")
    if secret is not None:
        if not isinstance(secret, str) or len(secret.strip()) < 8 or secret != secret.strip():
            raise KeysFileError(
                f"{where}: `secret` must be a string of at least 8 characters, no spaces around"
            )
        return secret_hash(secret)
    digest = digest.removeprefix("sha256:") if isinstance(digest, str) else ""
    if not SHA256_PATTERN.fullmatch(digest):
        raise KeysFileError(
            f"{where}: `secret_sha256` must be 64 lowercase hex digits (sha256 of the secret)"
        )
    return digest


def _scopes(value, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise KeysFileError(f"{where}: `scopes` must be a non-empty list of {', '.join(SCOPES)}")
    unknown = [s for s in value if s not in SCOPES]
    if unknown:
        raise KeysFileError(f"{where}: unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
    return frozenset(value)


def _limit(entry: dict, field: str, where: str) -> int | None:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeysFileError(f"{where}: `{field}` must be a whole number of at least 1")
    return value


class KeyTable:
    """The keys in force; `find(token)` is what authentication asks. Safe from any thread."""

    def __init__(self, env_secrets: list[str], keys_file: Path | None = None):
        self.keys_file = Path(keys_file) if keys_file else None
        self._env = env_tenants(env_secrets)
        self._lock = threading.Lock()
        self._file_keys: list[Tenant] = []
        self._stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        if self.keys_file is not None:
            self._stamp = _stamp(self.keys_file)
            self._file_keys = parse_keys_file(self.keys_file)  # a bad file stops the start

    @property
    def enabled(self) -> bool:
        """Whether requests need a key at all."""
        return bool(self._env) or self.keys_file is not None

    def tenants(self) -> list[Tenant]:
        """Every key in force; a secret both in the file and in OCTOFLUX_API_KEYS is the file's."""
        self._maybe_reload()
        return [*self._file_keys, *self._env]

    def find(self, token: str) -> Tenant | None:
        """The key whose secret `token` is; compared with every key, so the time taken says nothing."""
        presented = secret_hash(token)
        found = None
        for tenant in self.tenants():
            if hmac.compare_digest(presented, tenant.owner) and found is None:
                found = tenant
        return found

    def reload(self) -> bool:
        """Read the file now; on a bad file log why and keep the keys in force. True if it loaded."""
        if self.keys_file is None:
            return False
        with self._lock:
            stamp = _stamp(self.keys_file)
            try:
                keys = parse_keys_file(self.keys_file)
            except KeysFileError as exc:
                self._stamp = stamp  # do not log the same bad file every second
                log.error("%s; keeping the %d keys loaded before", exc, len(self._file_keys))
                return False
            self._file_keys, self._stamp = keys, stamp
        log.info("keys file %s: %d keys loaded", self.keys_file, len(keys))
        return True

    def _maybe_reload(self) -> None:
        if self.keys_file is None:
            return
        now = time.monotonic()
        if now - self._checked_at < POLL_EVERY_S:
            return
        self._checked_at = now
        if _stamp(self.keys_file) != self._stamp:
            self.reload()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
