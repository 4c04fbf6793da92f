"""OctoAI's asset library for LoRAs: `/v1/assets`, as the octoai SDK's `asset_library` calls it.

create (bearer) → PUT the raw file to `put_url` (no bearer: the URL's token is the capability)
→ complete-upload (bearer; the file is checked, then `ready` or `rejected` with the reason)
→ get / list / delete (bearer). A ready LoRA is usable by name in `loras` of a generate call.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from octoflux.api.common.auth import require_bearer
from octoflux.api.common.deps import Service
from octoflux.api.common.owners import asset_space
from octoflux.api.octoai.protocol import ErrorDetail
from octoflux.core.errors import InvalidField
from octoflux.pipelines.loras import NAME_PATTERN

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


def _check_create(body: CreateAssetRequest) -> dict:
    """The LoRA data to store; a 422 naming the field for anything this server cannot hold."""
    if body.asset_type != "lora":
        raise InvalidField("asset_type", f"only LoRA assets are served here, not {body.asset_type!r}")
    if not NAME_PATTERN.fullmatch(body.name):
        raise InvalidField("name", f"name {body.name!r} must be 1-128 characters from A-Z a-z 0-9 . _ -")
    data = dict(body.data)
    if data.get("asset_type", "lora") != "lora":
        raise InvalidField("data", "data.asset_type must be 'lora'")
    if data.get("engine") != ENGINE:
        raise InvalidField(
            "data", f"data.engine must be {ENGINE!r} on this server, not {data.get('engine')!r}"
        )
    if data.get("file_format") not in (None, "safetensors"):
        raise InvalidField(
            "data", "data.file_format must be 'safetensors': pickle (.pt/.ckpt) files are refused"
        )
    if body.transfer_api_type not in (None, "presigned-url", "any"):
        raise InvalidField("transfer_api_type", "only 'presigned-url' uploads are supported")
    for field in ("url", "hf_repo"):
        if getattr(body, field):
            raise InvalidField(field, "creating an asset from a URL is not supported; upload the file")
    return {**data, "asset_type": "lora", "file_format": "safetensors"}


def _transfer_api(request: Request, asset_id: str, token: str) -> dict:
    put_url = request.url_for("upload_asset_file", asset_id=asset_id).include_query_params(token=token)
    get_url = request.url_for("download_asset_file", asset_id=asset_id).include_query_params(token=token)
    return {"type": "presigned-url", "put_url": str(put_url), "get_url": str(get_url)}


ERROR_DESCRIPTIONS = {
    401: "Missing or invalid bearer token",
    403: "Upload/download token wrong or expired; a shared asset (admin keys only); no `assets` scope",
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
    responses=errors(401, 403, 409),
    summary="Create a LoRA asset and get its upload URL",
)
async def create_asset(body: CreateAssetRequest, request: Request, service: Service):
    data = _check_create(body)
    asset, token = await service.assets.create(body.name, body.description or "", data, asset_space(request))
    return {"asset": asset, "transfer_api": _transfer_api(request, asset["id"], token)}


@router.get(
    "/v1/assets",
    dependencies=bearer,
    responses=errors(401, 403),
    summary="List LoRA assets: the key's own, then shared ones",
)
async def list_assets(
    request: Request,
    service: Service,
    name: str | None = None,
    asset_type: list[str] | None = Query(None),
    engine: list[str] | None = Query(None),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
):
    assets = await service.assets.all(asset_space(request))
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
async def get_asset(asset_id: str, request: Request, service: Service):
    asset = await service.assets.find(asset_id, asset_space(request))
    return {"asset": asset, "transfer_api": {"type": "none"}}


@router.delete(
    "/v1/assets/{asset_id}",
    dependencies=bearer,
    responses=errors(401, 403, 404),
    summary="Delete an asset and its file (a shared one: admin keys only)",
)
async def delete_asset(asset_id: str, request: Request, service: Service):
    return await service.assets.delete(asset_id, asset_space(request))


@router.put(
    "/v1/assets/{asset_id}/upload",
    name="upload_asset_file",
    responses=errors(403, 404, 409, 413),
    summary="Upload the file (no bearer)",
)
async def upload_asset_file(asset_id: str, request: Request, service: Service, token: str = ""):
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else None
    size = await service.assets.upload(asset_id, token, request.stream(), length)
    return {"size_bytes": size}


@router.get(
    "/v1/assets/{asset_id}/download",
    name="download_asset_file",
    responses=errors(403, 404, 409),
    summary="Download (no bearer)",
)
async def download_asset_file(asset_id: str, service: Service, token: str = ""):
    path = await service.assets.file(asset_id, token)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.post(
    "/v1/assets/{asset_id}/complete-upload",
    dependencies=bearer,
    responses=errors(401, 404, 409, 503),
    summary="Check, then publish",
)
async def complete_upload(asset_id: str, request: Request, service: Service):
    return {"error": await service.assets.complete_upload(asset_id, asset_space(request))}
