"""OctoAI's asset library for LoRAs: `/v1/assets`, as the octoai SDK's `asset_library` calls it.

create (bearer) → PUT the raw file to `put_url` (no bearer: the URL's token is the capability)
→ complete-upload (bearer; the file is checked, then `ready` or `rejected` with the reason)
→ get / list / delete (bearer). A ready LoRA is usable by name in `loras` of a generate call.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from pipelines.loras import NAME_PATTERN, LoraError, read_lora
from server.asset_store import AssetConflict, AssetNotFound, AssetStore, UploadDenied
from server.auth import require_bearer
from server.errors import ServiceUnavailable, invalid
from server.schemas import ErrorDetail

router = APIRouter(tags=["assets"])
bearer = [Depends(require_bearer)]
ENGINE = "image/flux-dev"


def is_upload_path(path: str) -> bool:
    """The PUT route checks `--max-lora-mb` itself, instead of the general body limit."""
    return path.startswith("/v1/assets/") and path.endswith("/upload")


class CreateAssetRequest(BaseModel):
    asset_type: str
    data: dict[str, Any]
    name: str
    description: str | None = None
    is_public: bool | None = None
    transfer_api_type: str | None = None
    url: str | None = None
    hf_repo: str | None = None
    hf_token_secret: str | None = None
    skip_validation: bool | None = None


def _store(request: Request) -> AssetStore:
    return request.app.state.assets


def _not_found(asset_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no asset {asset_id!r}")


def _check_create(body: CreateAssetRequest) -> dict:
    """The LoRA data to store; a 422 naming the field for anything this server cannot hold."""
    if body.asset_type != "lora":
        raise invalid("asset_type", f"only LoRA assets are served here, not {body.asset_type!r}")
    if not NAME_PATTERN.fullmatch(body.name):
        raise invalid("name", f"name {body.name!r} must be 1-128 characters from A-Z a-z 0-9 . _ -")
    data = dict(body.data)
    if data.get("asset_type", "lora") != "lora":
        raise invalid("data", "data.asset_type must be 'lora'")
    if data.get("engine") != ENGINE:
        raise invalid("data", f"data.engine must be {ENGINE!r} on this server, not {data.get('engine')!r}")
    if data.get("file_format") not in (None, "safetensors"):
        raise invalid("data", "data.file_format must be 'safetensors': pickle (.pt/.ckpt) files are refused")
    if body.transfer_api_type not in (None, "presigned-url", "any"):
        raise invalid("transfer_api_type", "only 'presigned-url' uploads are supported")
    for field in ("url", "hf_repo"):
        if getattr(body, field):
            raise invalid(field, "creating an asset from a URL is not supported; upload the file")
    return {**data, "asset_type": "lora", "file_format": "safetensors"}


def _transfer_api(request: Request, asset_id: str, token: str) -> dict:
    put_url = request.url_for("upload_asset_file", asset_id=asset_id).include_query_params(token=token)
    get_url = request.url_for("download_asset_file", asset_id=asset_id).include_query_params(token=token)
    return {"type": "presigned-url", "put_url": str(put_url), "get_url": str(get_url)}


ERROR_DESCRIPTIONS = {
    401: "Missing or invalid bearer token",
    403: "Upload or download token wrong or expired",
    404: "No such asset",
    409: "The asset is not in a state that allows this",
    413: "File over --max-lora-mb",
    503: "Model still loading; retry",
}


def errors(*codes: int) -> dict:
    """OpenAPI `responses` for the error statuses a route can answer with."""
    return {code: {"model": ErrorDetail, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


@router.post(
    "/v1/assets",
    dependencies=bearer,
    responses=errors(401, 409),
    summary="Create a LoRA asset and get its upload URL",
)
async def create_asset(body: CreateAssetRequest, request: Request):
    data = _check_create(body)
    try:
        store = _store(request)
        asset, token = await run_in_threadpool(store.create, body.name, body.description or "", data)
    except AssetConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return {"asset": asset, "transfer_api": _transfer_api(request, asset["id"], token)}


@router.get("/v1/assets", dependencies=bearer, responses=errors(401), summary="List LoRA assets")
async def list_assets(
    request: Request,
    name: str | None = None,
    asset_type: list[str] | None = Query(None),
    engine: list[str] | None = Query(None),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
):
    assets = await run_in_threadpool(_store(request).all)
    if name is not None:
        assets = [a for a in assets if a["name"] == name]
    if asset_type:
        assets = [a for a in assets if a["asset_type"] in asset_type]
    if engine:
        assets = [a for a in assets if a["data"].get("engine") in engine]
    page = assets[offset : offset + limit]
    return {"data": page, "has_more": offset + len(page) < len(assets), "total": len(assets)}


@router.get(
    "/v1/assets/{asset_id}",
    dependencies=bearer,
    responses=errors(401, 404),
    summary="Get an asset by id or [owner:]name",
)
async def get_asset(asset_id: str, request: Request):
    try:
        asset = await run_in_threadpool(_store(request).find, asset_id)
    except AssetNotFound:
        raise _not_found(asset_id) from None
    return {"asset": asset, "transfer_api": {"type": "none"}}


@router.delete(
    "/v1/assets/{asset_id}",
    dependencies=bearer,
    responses=errors(401, 404),
    summary="Delete an asset and its file",
)
async def delete_asset(asset_id: str, request: Request):
    try:
        return await run_in_threadpool(_store(request).delete, asset_id)
    except (AssetNotFound, LoraError):
        raise _not_found(asset_id) from None


class _TooLarge(Exception):
    pass


async def _receive(request: Request, store: AssetStore, asset_id: str, max_bytes: int) -> int:
    """Stream the body to a temp file; it becomes the staged file only once complete."""
    temp = store.temp_file(asset_id)
    size = 0
    try:
        with temp.open("wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _TooLarge()
                await run_in_threadpool(fh.write, chunk)
        store.finish_upload(asset_id, temp, size)
    finally:
        temp.unlink(missing_ok=True)
    return size


@router.put(
    "/v1/assets/{asset_id}/upload",
    name="upload_asset_file",
    responses=errors(403, 404, 409, 413),
    summary="Upload the file (no bearer)",
)
async def upload_asset_file(asset_id: str, request: Request, token: str = ""):
    store = _store(request)
    max_bytes = int(request.app.state.settings.max_lora_mb * 2**20)
    try:
        store.authorize(asset_id, token)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise _TooLarge()
        store.begin_upload(asset_id)
        size = await _receive(request, store, asset_id, max_bytes)
    except AssetNotFound:
        raise _not_found(asset_id) from None
    except UploadDenied as exc:
        raise HTTPException(status_code=403, detail=str(exc)) from None
    except AssetConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except _TooLarge:
        reason = f"the file exceeds the {max_bytes / 2**20:.4g} MB limit (--max-lora-mb)"
        store.reject(asset_id, reason)
        return JSONResponse(status_code=413, content={"detail": reason})
    except ClientDisconnect:
        store.set_status(asset_id, "ready_to_upload", "the upload was interrupted; PUT the file again")
        raise
    return {"size_bytes": size}


@router.get(
    "/v1/assets/{asset_id}/download",
    name="download_asset_file",
    responses=errors(403, 404, 409),
    summary="Download (no bearer)",
)
async def download_asset_file(asset_id: str, request: Request, token: str = ""):
    store = _store(request)
    try:
        record = store.authorize(asset_id, token)
    except AssetNotFound:
        raise _not_found(asset_id) from None
    except UploadDenied as exc:
        raise HTTPException(status_code=403, detail=str(exc)) from None
    path = store.library.path(record.name)
    if record.status != "ready" or not path.is_file():
        raise HTTPException(status_code=409, detail=f"asset {asset_id} is not ready")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.post(
    "/v1/assets/{asset_id}/complete-upload",
    dependencies=bearer,
    responses=errors(401, 404, 409, 503),
    summary="Check, then publish",
)
async def complete_upload(asset_id: str, request: Request):
    state = request.app.state
    if not state.ready.is_set():
        raise ServiceUnavailable("model is still loading; LoRAs are checked against it", retry_after=5)
    store = _store(request)
    try:
        record = store.begin_validation(asset_id)
    except AssetNotFound:
        raise _not_found(asset_id) from None
    except AssetConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    cache = getattr(state.engine, "loras", None)
    try:
        if cache is None:
            raise AssetConflict("this server serves no LoRAs")
        staged = store.staging_file(asset_id)
        await run_in_threadpool(read_lora, staged, record.name, cache.shapes, cache.max_bytes)
        await run_in_threadpool(store.publish, asset_id)
    except (LoraError, AssetConflict) as exc:
        await run_in_threadpool(store.reject, asset_id, str(exc))
        return {"error": str(exc)}
    except (OSError, AssetNotFound):  # deleted while it was being checked
        raise HTTPException(
            status_code=409, detail=f"asset {asset_id} was deleted during validation"
        ) from None
    finally:
        store.end_validation(asset_id)
    return {"error": None}
