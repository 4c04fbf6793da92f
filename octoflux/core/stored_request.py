"""An accepted async request as the state store keeps it: the validated `GenerationSpec` (seeds already
fixed, images as PNG, which is lossless) and how its dialect renders the finished body. Whichever process
leases the job later rebuilds it from these bytes, so a re-run gives the same pixels and the same body."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field, fields

from PIL import Image

from octoflux.pipelines.engine import GenerationSpec

FORMAT_VERSION = 1
SPEC_FIELDS = {f.name for f in fields(GenerationSpec)}


class UnreadableRequest(ValueError):
    """Stored bytes that are not a request this server can run."""


@dataclass
class StoredRequest:
    spec: GenerationSpec
    dialect: str  # whose renderer makes the finished body (octoflux/core/renderers.py)
    options: dict = field(default_factory=dict)  # the renderer's options, JSON values

    def to_bytes(self) -> bytes:
        """Every field of the spec: images as base64 PNG under "images", the rest as JSON values."""
        spec, images = {}, {}
        for name in sorted(SPEC_FIELDS):
            value = getattr(self.spec, name)
            if isinstance(value, Image.Image):
                images[name] = _png_b64(value)
            else:
                spec[name] = value
        document = {
            "version": FORMAT_VERSION,
            "dialect": self.dialect,
            "options": self.options,
            "spec": spec,
            "images": images,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredRequest:
        try:
            document = json.loads(data)
            if document.get("version") != FORMAT_VERSION:
                raise UnreadableRequest(f"stored request format {document.get('version')!r} is not known")
            images = {name: _image(encoded) for name, encoded in document["images"].items()}
            stored = {**document["spec"], **images}
            unknown = set(stored) - SPEC_FIELDS
            if unknown:  # stored by a newer octoflux
                raise UnreadableRequest(
                    f"stored request has fields this server does not know: {sorted(unknown)}"
                )
            return cls(GenerationSpec(**stored), document["dialect"], document["options"])
        except UnreadableRequest:
            raise
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise UnreadableRequest(f"stored request unreadable: {type(exc).__name__}: {exc}") from None


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(encoded: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    image.load()
    return image
