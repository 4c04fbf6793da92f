"""The playground: a page at `/` and its files under `/playground/`, served without a token.

The page is plain HTML, CSS and JavaScript modules shipped in the package (no build step, no CDN);
it calls only the public API, with the token the user types, like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[2] / "static" / "playground"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Everything comes from this server: scripts and styles from files, images as data: or blob: URLs.
# connect-src stays open to http(s) so that a --public-url on another host still answers polls.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self' data: http: https:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    media_type = MEDIA_TYPES.get(path.suffix)
    # `name` is one path segment (no "/"), and only files of the known kinds are served.
    if media_type is None or name.startswith(".") or not path.is_file():
        raise HTTPException(status_code=404, detail=f"no playground file {name!r}")
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/")
async def playground_page() -> FileResponse:
    return _file("index.html")


@router.get("/playground/{name}")
async def playground_file(name: str) -> FileResponse:
    return _file(name)
