"""OctoAI asset records for LoRAs: records in the shared state store, upload capabilities, staging.

Records live in the `StateStore` (octoflux/state/store.py), so every replica lists and serves the
same assets and they survive restarts; status changes are compare-and-set, so two replicas never
accept two uploads of one name or validate one upload twice. The files live in the LoRA folder
(a shared volume when replicas run on several nodes). An upload is written to
`<lora_dir>/.uploads/` and linked into the folder under its name only once it is complete and
valid, so a half-written or rejected file is never a usable LoRA. Files dropped into the folder
by hand are listed as ready assets too (id `file_<name>`).

Assets belong to a space: the shared one (`None`: hand-placed files, and what an admin key or a
server without keys creates) or an API key's own (its owner id). A record's stored `name` is its LoRA
key (`name`, or `<space>/<name>` with the file in `<lora_dir>/.tenants/<space>/`), so names are unique
per space. A caller sees its own space and the shared one, its own first; it deletes only in its own
space (an admin's own space is the shared one). Another key's asset is a 404, as if it did not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from octoflux.core.errors import Conflict, Forbidden, NotFound
from octoflux.pipelines.loras import LoraError, LoraLibrary, lora_name
from octoflux.state.store import RecordNotFound, StateStore, StatusConflict

log = logging.getLogger(__name__)

LEGACY_SIDECAR = ".assets.json"  # where records lived before the state store; imported once
STAGING = ".uploads"
TENANT = "octoflux-local"
FILE_ID_PREFIX = "file_"
VALIDATING = "validating"  # stored only: clients see "uploaded" with the details saying so
LIVE_STATUSES = {"ready_to_upload", "uploading", "uploaded", VALIDATING, "ready"}
TAKES_UPLOADS = {"ready_to_upload", "uploading", "uploaded"}
# A validation not finished after this long is taken for one whose replica died; another may retry.
VALIDATION_LEASE_S = 600.0


class AssetNotFound(NotFound):
    def __init__(self, asset_id: str):
        super().__init__(f"no asset {asset_id!r}")


class AssetConflict(Conflict):
    """The request does not fit the asset's state, or the name is taken."""


class UploadDenied(Forbidden):
    """The PUT URL's token is wrong or expired."""


class SharedAsset(Forbidden):
    """A shared asset: every key uses it, only an admin key deletes it."""


def space_key(space: str | None, name: str) -> str:
    """The LoRA key (and stored name) of `name` in `space`."""
    return f"{space}/{name}" if space else name


def _now_iso(epoch: float | None = None) -> str:
    return datetime.fromtimestamp(epoch if epoch is not None else time.time(), UTC).isoformat()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class AssetRecord:
    id: str
    name: str
    description: str
    data: dict
    status: str
    status_details: str
    size_bytes: int
    created_at: str
    token_sha256: str
    expires_at: float
    validating_since: float = 0.0

    @classmethod
    def from_dict(cls, raw: dict) -> AssetRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def space(self) -> str | None:
        return self.name.rpartition("/")[0] or None

    @property
    def shown_name(self) -> str:
        return self.name.rpartition("/")[2]

    def visible_to(self, space: str | None) -> bool:
        return self.space is None or self.space == space


class AssetStore:
    """Asset records of one LoRA folder, kept in the state store; safe from any thread or replica."""

    def __init__(self, library: LoraLibrary, upload_ttl_s: float, store: StateStore):
        self.library = library
        self.upload_ttl_s = upload_ttl_s
        self.store = store
        self.staging = library.directory / STAGING
        self.staging.mkdir(exist_ok=True)
        self._import_legacy_sidecar()

    def _import_legacy_sidecar(self) -> None:
        """Records an older version kept in `<lora_dir>/.assets.json` move into the store once."""
        sidecar = self.library.directory / LEGACY_SIDECAR
        try:
            raw = json.loads(sidecar.read_text())
        except (FileNotFoundError, ValueError):
            return
        for asset_id, record in raw.items():
            if self.store.get_asset(asset_id) is None:
                self.store.put_asset(asset_id, record)
        with contextlib.suppress(OSError):  # another replica moved it first
            os.replace(sidecar, sidecar.with_name(f"{LEGACY_SIDECAR}.imported"))
        log.info("imported %d asset records from %s into the state store", len(raw), sidecar)

    # ------------------------------------------------------------ views

    def public(self, record: AssetRecord) -> dict:
        """The `Asset` object of OctoAI's API (every field the SDK requires)."""
        status, details = record.status, record.status_details
        if status == VALIDATING:
            status, details = "uploaded", "being validated"
        elif status == "ready" and not self.library.path(record.name).is_file():
            status = "deleted"  # removed from the folder by hand
        return {
            "id": record.id,
            "name": record.shown_name,
            "asset_type": "lora",
            "data": record.data,
            "description": record.description,
            "size_bytes": record.size_bytes,
            "status": status,
            "status_details": details,
            "created_at": record.created_at,
            "tenant_uuid": TENANT,
            "file_structure": "single_file",
            "is_public": record.space is None,
        }

    def _file_asset(self, name: str) -> dict:
        stat = self.library.path(name).stat()
        record = AssetRecord(
            id=f"{FILE_ID_PREFIX}{name}",
            name=name,
            description="found in the LoRA folder",
            data={"asset_type": "lora", "engine": "image/flux-dev", "file_format": "safetensors"},
            status="ready",
            status_details="",
            size_bytes=stat.st_size,
            created_at=_now_iso(stat.st_mtime),
            token_sha256="",
            expires_at=0.0,
        )
        return self.public(record)

    def all(self, space: str | None = None) -> list[dict]:
        """What `space` sees: its own uploaded assets, then shared ones (newest first), then
        hand-placed files, by name."""
        records = [AssetRecord.from_dict(raw) for raw in self.store.list_assets()]
        records = [r for r in records if r.visible_to(space)]
        records.sort(key=lambda r: r.created_at, reverse=True)
        records.sort(key=lambda r: r.space is None)  # stable: own first, each newest first
        assets = [self.public(r) for r in records]
        recorded = {r.name for r in records}
        assets += [self._file_asset(n) for n in self.library.names() if n not in recorded]
        return [a for a in assets if a["status"] != "deleted"]

    def find(self, id_or_ref: str, space: str | None = None) -> dict:
        """By id, or by `name` / `owner:name` (the caller's own first, then shared)."""
        raw = self.store.get_asset(id_or_ref)
        if raw is not None:
            record = AssetRecord.from_dict(raw)
            if not record.visible_to(space):
                raise AssetNotFound(id_or_ref)
            return self.public(record)
        name = id_or_ref.removeprefix(FILE_ID_PREFIX) if id_or_ref.startswith(FILE_ID_PREFIX) else None
        if name is None:
            try:
                name = lora_name(id_or_ref)
            except LoraError:
                raise AssetNotFound(id_or_ref) from None
        for asset in self.all(space):
            if asset["name"] == name:
                return asset
        raise AssetNotFound(id_or_ref)

    def record(self, asset_id: str) -> AssetRecord:
        raw = self.store.get_asset(asset_id)
        if raw is None:
            raise AssetNotFound(asset_id)
        return AssetRecord.from_dict(raw)

    def accessible(self, asset_id: str, space: str | None, *, owned: bool = False) -> AssetRecord:
        """The record if `space` sees it, else AssetNotFound; `owned`: `SharedAsset` unless it is in
        `space` itself."""
        record = self.record(asset_id)
        if not record.visible_to(space):
            raise AssetNotFound(asset_id)
        if owned and record.space != space:
            raise SharedAsset(f"asset {asset_id} is shared: only an admin key changes or deletes it")
        return record

    def _update(self, asset_id: str, expected: str | set[str] | None, **changes) -> AssetRecord:
        """Compare-and-set on the stored status; AssetNotFound or AssetConflict saying what was found."""
        try:
            return AssetRecord.from_dict(self.store.update_asset(asset_id, expected, changes))
        except RecordNotFound:
            raise AssetNotFound(asset_id) from None
        except StatusConflict as exc:
            current = "being validated" if exc.current == VALIDATING else exc.current
            raise AssetConflict(f"asset {asset_id} is {current}") from None

    # ------------------------------------------------------------ lifecycle

    def create(self, name: str, description: str, data: dict, space: str | None = None) -> tuple[dict, str]:
        """A record in `ready_to_upload` in `space` and the secret token of its PUT URL."""
        token = secrets.token_urlsafe(32)
        key = space_key(space, name)
        record = AssetRecord(
            id=f"asset_{uuid.uuid4().hex}",
            name=key,
            description=description,
            data=data,
            status="ready_to_upload",
            status_details="waiting for the file (PUT it to put_url)",
            size_bytes=0,
            created_at=_now_iso(),
            token_sha256=_digest(token),
            expires_at=time.time() + self.upload_ttl_s,
        )
        # Rejected or deleted records of the same name are superseded by the store.
        if self.library.path(key).exists() or not self.store.create_asset(asdict(record), LIVE_STATUSES):
            raise AssetConflict(f"an asset named {name!r} already exists")
        return self.public(record), token

    def authorize(self, asset_id: str, token: str) -> AssetRecord:
        """The record a PUT/GET URL's token opens, or UploadDenied saying why."""
        record = self.record(asset_id)
        if not token or not hmac.compare_digest(_digest(token), record.token_sha256):
            raise UploadDenied("invalid upload token for this asset")
        if time.time() > record.expires_at:
            raise UploadDenied("the upload URL has expired; create the asset again")
        return record

    def staging_file(self, asset_id: str) -> Path:
        return self.staging / f"{asset_id}.safetensors"

    def temp_file(self, asset_id: str) -> Path:
        return self.staging / f"{asset_id}.{uuid.uuid4().hex}.part"

    def set_status(self, asset_id: str, status: str, details: str, size: int | None = None) -> None:
        changes = {"status": status, "status_details": details}
        if size is not None:
            changes["size_bytes"] = size
        self._update(asset_id, None, **changes)

    def begin_upload(self, asset_id: str) -> None:
        try:
            self._update(asset_id, TAKES_UPLOADS, status="uploading", status_details="receiving the file")
        except AssetConflict as exc:
            raise AssetConflict(f"{exc.message}; it takes no more uploads") from None

    def finish_upload(self, asset_id: str, temp: Path, size: int) -> None:
        """The complete PUT body becomes the staged file."""
        # Not while it is validated (nor once deleted): the caller drops the temp file then.
        self._update(asset_id, TAKES_UPLOADS, status="uploaded", status_details="", size_bytes=size)
        os.replace(temp, self.staging_file(asset_id))

    def begin_validation(self, asset_id: str) -> AssetRecord:
        """Claim the staged file for checking; only one replica wins (a stale claim can be retaken)."""
        record = self.record(asset_id)
        stale = record.status == VALIDATING and time.time() - record.validating_since > VALIDATION_LEASE_S
        expected = VALIDATING if stale else "uploaded"
        try:
            return self._update(asset_id, expected, status=VALIDATING, validating_since=time.time())
        except AssetConflict as exc:
            raise AssetConflict(f"{exc.message}, not uploaded") from None

    def end_validation(self, asset_id: str) -> None:
        """A validation that neither published nor rejected hands the upload back."""
        with contextlib.suppress(AssetNotFound, AssetConflict):
            self._update(asset_id, VALIDATING, status="uploaded", status_details="")

    def publish(self, asset_id: str) -> None:
        """Link the staged file into the LoRA folder under its name; never overwrites a file."""
        record = self.record(asset_id)
        staged = self.staging_file(asset_id)
        target = self.library.path(record.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(staged, target)
        except FileExistsError:
            staged.unlink(missing_ok=True)
            reason = f"a LoRA named {record.name!r} appeared in the folder meanwhile"
            raise AssetConflict(reason) from None
        try:
            self._update(asset_id, VALIDATING, status="ready", status_details="")
        except AssetNotFound:  # deleted during validation: the file goes too
            target.unlink(missing_ok=True)
            staged.unlink(missing_ok=True)
            raise
        except BaseException:  # the record could not say ready (the store failing): no file without it
            target.unlink(missing_ok=True)  # the staged copy stays for a retry
            raise
        staged.unlink(missing_ok=True)

    def reject(self, asset_id: str, reason: str) -> None:
        self.staging_file(asset_id).unlink(missing_ok=True)
        with contextlib.suppress(AssetNotFound):  # deleted meanwhile: nothing left to mark
            self.set_status(asset_id, "rejected", reason)

    def delete(self, id_or_file: str, space: str | None = None) -> dict:
        """Remove the asset of `space` and its file; returns `{"id", "deleted_at"}`. A shared one
        seen from another space is `SharedAsset` (403)."""
        raw = self.store.get_asset(id_or_file)
        if raw is None:
            if not id_or_file.startswith(FILE_ID_PREFIX):
                raise AssetNotFound(id_or_file)
            name = lora_name(id_or_file.removeprefix(FILE_ID_PREFIX))
            if not self.library.path(name).is_file():
                raise AssetNotFound(id_or_file)
            if space is not None:
                raise SharedAsset(f"asset {id_or_file} is shared: only an admin key deletes it")
            self.library.path(name).unlink(missing_ok=True)
        else:
            record = self.accessible(id_or_file, space, owned=True)
            if not self.store.delete_asset(record.id):
                raise AssetNotFound(id_or_file)  # another replica deleted it first
            self.staging_file(record.id).unlink(missing_ok=True)
            if record.status == "ready":
                self.library.path(record.name).unlink(missing_ok=True)
        return {"id": id_or_file, "deleted_at": _now_iso()}
