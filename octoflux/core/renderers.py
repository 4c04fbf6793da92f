"""Dialects' renderers by name: how a finished async job becomes the body its result URL returns.

The core cannot import a dialect, and a job may finish in another process (or after a restart) than
the one that accepted it, so a stored job names its dialect and each dialect registers its renderer
here when its routes are imported (at app start).
"""

from __future__ import annotations

from collections.abc import Callable

from octoflux.core.generation import Generated

# (the finished request, the options stored with it) -> the body; runs on a worker thread.
Renderer = Callable[[Generated, dict], bytes]

_RENDERERS: dict[str, Renderer] = {}


class UnknownDialect(LookupError):
    """No renderer registered under that name in this process."""


def register(dialect: str, renderer: Renderer) -> None:
    _RENDERERS[dialect] = renderer


def renderer_for(dialect: str, options: dict) -> Callable[[Generated], bytes]:
    """The body renderer of `dialect` bound to `options`; `UnknownDialect` if none is registered."""
    try:
        renderer = _RENDERERS[dialect]
    except KeyError:
        raise UnknownDialect(f"no renderer for the {dialect!r} dialect in this server") from None
    return lambda generated: renderer(generated, options)
