"""`octoflux serve` and `octoflux make-tiny DIR`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.settings import Settings


def _serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="start the HTTP server (flags override OCTOFLUX_* env vars)")
    serve.add_argument(
        "--model",
        help="'tiny' (default), 'random-full', a diffusers folder, a hub id, or a .safetensors file",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--device", choices=["auto", "cuda", "cpu"])
    serve.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    serve.add_argument("--api-keys", help="comma-separated bearer tokens")
    serve.add_argument("--allow-unauthenticated", action="store_true", default=None)
    serve.add_argument("--max-body-mb", type=float)
    serve.add_argument("--max-image-mb", type=float, help="largest decoded request image")
    serve.add_argument("--max-image-pixels", type=int, help="pixel limit for request images")
    serve.add_argument("--max-queue", type=int)
    serve.add_argument("--max-batch", type=int, help="images per forward pass")
    serve.add_argument("--lora-dir", type=Path)
    serve.add_argument("--lora-cache-size", type=int)
    serve.add_argument("--lora-slots", type=int, help="compiled modes: LoRA slots = most LoRAs per request")
    serve.add_argument("--lora-max-rank", type=int, help="compiled modes: highest LoRA rank accepted")
    serve.add_argument("--max-lora-mb", type=float)
    serve.add_argument("--lora-upload-ttl-s", type=float, help="lifetime of an asset upload URL")
    serve.add_argument("--tiny-dir", type=Path, help="where --model tiny is written once")
    serve.add_argument("--no-warmup", dest="warmup", action="store_false", default=None)
    serve.add_argument("--request-timeout", type=float, help="seconds a sync request may take (0: no limit)")
    serve.add_argument("--shutdown-timeout", type=float, help="seconds the running job gets on SIGTERM")
    serve.add_argument("--result-ttl", type=float, help="seconds async results are kept")
    serve.add_argument("--max-result-mb", type=float, help="async results held in memory before spilling")
    serve.add_argument("--results-dir", type=Path, help="where spilled async results go")
    serve.add_argument("--public-url", help="base URL for async poll/response URLs")
    serve.add_argument("--warmup-sizes", help="comma-separated WxH sizes warmed (and compiled) before ready")
    scale = serve.add_argument_group("more than one GPU (Ray Serve; server/replicas.py)")
    scale.add_argument("--replicas", help="a number, or 'auto' (one per GPU); default 1: no Ray")
    scale.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    scale.add_argument("--min-replicas", type=int, help="autoscaling: the fewest replicas")
    scale.add_argument("--max-replicas", type=int, help="autoscaling: the most replicas")
    serve.add_argument("--state-url", help="sqlite:///PATH/state.db or redis://HOST:PORT/DB")
    serve.add_argument("--state-dir", type=Path, help="folder of the default SQLite state store")
    perf = serve.add_argument_group("speed and memory modes (pipelines/optimize.py)")
    perf.add_argument("--optimize", choices=["none", "compile", "fp8", "cache"])
    perf.add_argument("--cache-threshold", type=float, help="step-cache threshold for --optimize cache")
    perf.add_argument("--offload", choices=["none", "model", "sequential"])
    perf.add_argument("--quantize", choices=["none", "fp8", "int8", "nf4"], help="weight quantization")
    perf.add_argument("--attention-backend", help="'auto', 'native', or a diffusers backend name")
    perf.add_argument("--prompt-cache-size", type=int, help="prompt embeddings kept; 0 disables")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over environment variables, which win over defaults."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "dir") and v is not None}
    return Settings(**given)


def serve(settings: Settings) -> None:
    import uvicorn

    from server.app import create_app
    from server.requestlog import configure_access_log
    from server.shutdown import GracefulServer

    settings.check_auth_exposure()
    check_state_store(settings)
    if settings.uses_ray:
        from server.replicas import serve_replicas

        return serve_replicas(settings)
    configure_access_log()
    app = create_app(settings)
    # uvicorn's own access log would be a second, unstructured line per request.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    GracefulServer(config, app).run()


def check_state_store(settings: Settings) -> None:
    """A bad --state-url stops the server before anything starts, with one line."""
    from server.state_store import StateStoreError, open_state_store

    try:
        open_state_store(settings.resolved_state_url).close()
    except StateStoreError as exc:
        raise SystemExit(f"octoflux: {exc}") from None


TINY_VARIANTS = ("dev", "schnell", "safety-checker")


def make_tiny(directory: Path, variant: str = "dev", concept_threshold: float = 1.0) -> None:
    if variant == "safety-checker":
        from pipelines.safety import write_tiny_safety_checker

        path = write_tiny_safety_checker(directory, concept_threshold)
        print(f"wrote the tiny safety checker (concept threshold {concept_threshold}) to {path}")
        return
    from pipelines.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(directory, variant)
    print(f"wrote the tiny FLUX ({variant}) checkpoint to {path}")


def _make_tiny_parser(sub) -> None:
    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight model (diffusers format) for tests")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--variant",
        choices=TINY_VARIANTS,
        default="dev",
        help="FLUX.1-dev (default), schnell, or a safety checker",
    )
    tiny.add_argument(
        "--concept-threshold",
        type=float,
        default=1.0,
        help="safety-checker only: every concept's threshold (1.0 flags nothing, -1.0 flags everything)",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="octoflux", description="OctoAI-compatible FLUX.1-dev server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _make_tiny_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(settings_from_args(args))
    else:
        make_tiny(args.dir, args.variant, args.concept_threshold)


if __name__ == "__main__":
    sys.exit(main())
