"""OctoAI asset records for LoRAs: a JSON sidecar in the LoRA folder, upload capabilities, staging.

An upload is written to `<lora_dir>/.uploads/` and linked into the folder under its name only
once it is complete and valid, so a half-written or rejected file is never a usable LoRA.
Files dropped into the folder by hand are listed as ready assets too (id `file_<name>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipelines.loras import LoraError, LoraLibrary, lora_name
from server.errors import Conflict, Forbidden, NotFound

SIDECAR = ".assets.json"
STAGING = ".uploads"
TENANT = "octoflux-local"
FILE_ID_PREFIX = "file_"
LIVE_STATUSES = {"ready_to_upload", "uploading", "uploaded", "ready"}


class AssetNotFound(NotFound):
    def __init__(self, asset_id: str):
        super().__init__(f"no asset {asset_id!r}")


class AssetConflict(Conflict):
    """The request does not fit the asset's state, or the name is taken."""


class UploadDenied(Forbidden):
    """The PUT URL's token is wrong or expired."""


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


class AssetStore:
    """Asset records of one LoRA folder; every method is safe to call from any thread."""

    def __init__(self, library: LoraLibrary, upload_ttl_s: float):
        self.library = library
        self.upload_ttl_s = upload_ttl_s
        self.sidecar = library.directory / SIDECAR
        self.staging = library.directory / STAGING
        self.staging.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        # Assets whose staged file is being checked: no PUT and no second check meanwhile.
        self._validating: set[str] = set()
        self._records: dict[str, AssetRecord] = self._read()

    # ------------------------------------------------------------ persistence

    def _read(self) -> dict[str, AssetRecord]:
        try:
            raw = json.loads(self.sidecar.read_text())
        except FileNotFoundError:
            return {}
        return {key: AssetRecord(**value) for key, value in raw.items()}

    def _write(self) -> None:
        tmp = self.sidecar.with_name(f"{SIDECAR}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in self._records.items()}, indent=1))
        os.replace(tmp, self.sidecar)

    # ------------------------------------------------------------ views

    def public(self, record: AssetRecord) -> dict:
        """The `Asset` object of OctoAI's API (every field the SDK requires)."""
        status = record.status
        if status == "ready" and not self.library.path(record.name).is_file():
            status = "deleted"  # removed from the folder by hand
        return {
            "id": record.id,
            "name": record.name,
            "asset_type": "lora",
            "data": record.data,
            "description": record.description,
            "size_bytes": record.size_bytes,
            "status": status,
            "status_details": record.status_details,
            "created_at": record.created_at,
            "tenant_uuid": TENANT,
            "file_structure": "single_file",
            "is_public": False,
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

    def all(self) -> list[dict]:
        """Uploaded assets (newest first), then hand-placed files, by name."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)
            assets = [self.public(r) for r in records]
        recorded = {a["name"] for a in assets}
        assets += [self._file_asset(n) for n in self.library.names() if n not in recorded]
        return [a for a in assets if a["status"] != "deleted"]

    def find(self, id_or_ref: str) -> dict:
        """By id, or by `name` / `owner:name`."""
        with self._lock:
            if id_or_ref in self._records:
                return self.public(self._records[id_or_ref])
        name = id_or_ref.removeprefix(FILE_ID_PREFIX) if id_or_ref.startswith(FILE_ID_PREFIX) else None
        if name is None:
            try:
                name = lora_name(id_or_ref)
            except LoraError:
                raise AssetNotFound(id_or_ref) from None
        for asset in self.all():
            if asset["name"] == name:
                return asset
        raise AssetNotFound(id_or_ref)

    def record(self, asset_id: str) -> AssetRecord:
        with self._lock:
            return self._record(asset_id)

    def _record(self, asset_id: str) -> AssetRecord:
        record = self._records.get(asset_id)
        if record is None:
            raise AssetNotFound(asset_id)
        return record

    # ------------------------------------------------------------ lifecycle

    def create(self, name: str, description: str, data: dict) -> tuple[dict, str]:
        """A record in `ready_to_upload` and the secret token of its PUT URL."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            taken = self.library.path(name).exists() or any(
                r.name == name and r.status in LIVE_STATUSES for r in self._records.values()
            )
            if taken:
                raise AssetConflict(f"an asset named {name!r} already exists")
            record = AssetRecord(
                id=f"asset_{uuid.uuid4().hex}",
                name=name,
                description=description,
                data=data,
                status="ready_to_upload",
                status_details="waiting for the file (PUT it to put_url)",
                size_bytes=0,
                created_at=_now_iso(),
                token_sha256=_digest(token),
                expires_at=time.time() + self.upload_ttl_s,
            )
            # Rejected or deleted records of the same name are superseded.
            self._records = {k: r for k, r in self._records.items() if r.name != name}
            self._records[record.id] = record
            self._write()
            return self.public(record), token

    def authorize(self, asset_id: str, token: str) -> AssetRecord:
        """The record a PUT/GET URL's token opens, or UploadDenied saying why."""
        with self._lock:
            record = self._record(asset_id)
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
        with self._lock:
            record = self._record(asset_id)
            record.status, record.status_details = status, details
            if size is not None:
                record.size_bytes = size
            self._write()

    def begin_upload(self, asset_id: str) -> None:
        with self._lock:
            record = self._record(asset_id)
            if record.status not in ("ready_to_upload", "uploading", "uploaded"):
                raise AssetConflict(f"asset {asset_id} is {record.status}; it takes no more uploads")
            if asset_id in self._validating:
                raise AssetConflict(f"asset {asset_id} is being validated; it takes no more uploads")
            record.status, record.status_details = "uploading", "receiving the file"
            self._write()

    def finish_upload(self, asset_id: str, temp: Path, size: int) -> None:
        """The complete PUT body becomes the staged file."""
        with self._lock:
            record = self._record(asset_id)
            os.replace(temp, self.staging_file(asset_id))
            record.status, record.status_details, record.size_bytes = "uploaded", "", size
            self._write()

    def begin_validation(self, asset_id: str) -> AssetRecord:
        with self._lock:
            record = self._record(asset_id)
            if record.status != "uploaded":
                raise AssetConflict(f"asset {asset_id} is {record.status}, not uploaded")
            if asset_id in self._validating:
                raise AssetConflict(f"asset {asset_id} is already being validated")
            self._validating.add(asset_id)
            return record

    def end_validation(self, asset_id: str) -> None:
        with self._lock:
            self._validating.discard(asset_id)

    def publish(self, asset_id: str) -> None:
        """Link the staged file into the LoRA folder under its name; never overwrites a file."""
        with self._lock:
            record = self._record(asset_id)
            staged = self.staging_file(asset_id)
            try:
                os.link(staged, self.library.path(record.name))
            except FileExistsError:
                reason = f"a LoRA named {record.name!r} appeared in the folder meanwhile"
                raise AssetConflict(reason) from None
            finally:
                staged.unlink(missing_ok=True)
            record.status, record.status_details = "ready", ""
            self._write()

    def reject(self, asset_id: str, reason: str) -> None:
        self.staging_file(asset_id).unlink(missing_ok=True)
        with contextlib.suppress(AssetNotFound):  # deleted meanwhile: nothing left to mark
            self.set_status(asset_id, "rejected", reason)

    def delete(self, id_or_file: str) -> dict:
        """Remove the asset and its file; returns `{"id", "deleted_at"}`."""
        with self._lock:
            record = self._records.pop(id_or_file, None)
            if record is None:
                if not id_or_file.startswith(FILE_ID_PREFIX):
                    raise AssetNotFound(id_or_file)
                name = lora_name(id_or_file.removeprefix(FILE_ID_PREFIX))
                if not self.library.path(name).is_file():
                    raise AssetNotFound(id_or_file)
            else:
                name = record.name
                self.staging_file(record.id).unlink(missing_ok=True)
                self._write()
            if record is None or record.status == "ready":
                self.library.path(name).unlink(missing_ok=True)
        return {"id": id_or_file, "deleted_at": _now_iso()}
