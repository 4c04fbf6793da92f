"""`octoflux serve`, `octoflux make-tiny DIR`, `octoflux export-transformer DIR FILE` and
`octoflux export-text-encoder DIR FILE`.

`serve`'s flags are derived from `octoflux.settings.Settings` by pydantic-settings' CLI source: a
field with a description is a flag, in the `--help` group its `json_schema_extra` names.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import CliSettingsSource

from octoflux.settings import GROUPS, Settings

log = logging.getLogger("octoflux")

OTHER_GROUP = "other options"
# The CLI source names a value by its type; these read better in --help.
METAVARS = {"str": "TEXT", "int": "N", "float": "X", "Path": "PATH"}


class _GroupedFlags:
    """`add_argument_method` for the CLI source: each flag lands in its field's argument group."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.groups: dict[str, argparse._ArgumentGroup] = {}
        for title in (*GROUPS.values(), OTHER_GROUP):  # created up front: --help keeps GROUPS' order
            self.groups[title] = parser.add_argument_group(title)

    def __call__(self, context, *names, **kwargs):
        name = kwargs.get("dest", "")
        field = Settings.model_fields.get(name)
        if field is None:  # not a plain field (a nested model's flag): leave it as the source made it
            return context.add_argument(*names, **kwargs)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        title = GROUPS.get(str(extra.get("group")), OTHER_GROUP)
        kwargs["help"] = _help(field, kwargs.get("action"))
        metavar = kwargs.get("metavar")
        if isinstance(metavar, str) and not metavar.startswith("{"):  # a choice list stays as it is
            kwargs["metavar"] = METAVARS.get(metavar, name.upper())
        return self.groups[title].add_argument(*names, **kwargs)


def _help(field: FieldInfo, action) -> str:
    """The field's description, then its default unless the description already says it."""
    text = field.description or ""
    if action == "store_false":
        return f"turn off: {text}"
    if action == "store_true" or "(default" in text:
        return text
    default = field.get_default(call_default_factory=True)
    if default in (None, ""):
        return text
    return f"{text} (default: {default})".replace("%", "%%")


def _serve_parser(sub) -> CliSettingsSource[Settings]:
    serve = sub.add_parser(
        "serve",
        usage="octoflux serve [--FLAG VALUE ...]",
        help="start the HTTP server (flags override OCTOFLUX_* env vars)",
        description="Start the HTTP server. Every flag is also an OCTOFLUX_* environment variable "
        "(--max-queue: OCTOFLUX_MAX_QUEUE); a flag wins over the variable, which wins over the default.",
    )
    return CliSettingsSource(
        Settings,
        root_parser=serve,
        cli_kebab_case=True,
        cli_implicit_flags="toggle",
        cli_avoid_json=True,
        cli_hide_none_type=True,
        add_argument_method=_GroupedFlags(serve),
    )


def build_parser() -> tuple[argparse.ArgumentParser, CliSettingsSource[Settings]]:
    parser = argparse.ArgumentParser(prog="octoflux", description="OctoAI-compatible FLUX.1-dev server")
    sub = parser.add_subparsers(dest="command", required=True)
    source = _serve_parser(sub)
    _make_tiny_parser(sub)
    _export_parser(sub)
    _export_text_encoder_parser(sub)
    return parser, source


def settings_from_args(source: CliSettingsSource[Settings], args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over environment variables, which win over defaults."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "dir")}
    return Settings(_cli_settings_source=source(parsed_args=given))


SECRET_FIELDS = {"webhook_secret", "api_keys"}


def _flag_error(error: dict) -> str:
    name = ".".join(str(part) for part in error["loc"])
    shown = "(hidden)" if name in SECRET_FIELDS else repr(error["input"])
    return f"--{name.replace('_', '-')} (or OCTOFLUX_{name.upper()}) {shown}: {error['msg']}"


def check_model_paths(settings: Settings) -> None:
    """A `--model` that names no file, folder or cached hub id: one line on stderr and exit code 2, before
    torch and diffusers load (a typo costs a second, not several). `preflight` checks the rest."""
    from octoflux.pipelines.model_list import TINY_MODELS
    from octoflux.pipelines.model_paths import ModelLoadError, check_model_source

    try:
        for entry in settings.model_entries:
            if entry.source not in TINY_MODELS:
                check_model_source(entry.source)
    except ModelLoadError as exc:
        print(f"octoflux: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def preflight(settings: Settings) -> None:
    """Before the app starts: the models exist and fit, or one line on stderr and exit code 2."""
    from octoflux.core.engine_factory import check_model_set
    from octoflux.pipelines.loader import ModelLoadError, resolve_device, resolve_dtype
    from octoflux.pipelines.memory import WillNotFit, check_model_fits, check_set_fits

    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        entries = check_model_set(settings)
        sources = [_check_entry(settings, entry) for entry in entries]
        if len(entries) == 1:
            need = check_model_fits(
                sources[0],
                device,
                dtype,
                quantize=settings.quantize,
                offload=settings.offload,
                transformer_file=entries[0].transformer_file,
                text_encoder_file=settings.text_encoder_2,
            )
            saved = None
        else:
            models = [
                (e.label, source, e.transformer_file) for e, source in zip(entries, sources, strict=True)
            ]
            need, saved = check_set_fits(models, device, dtype, quantize=settings.quantize) or (None, None)
    except (ModelLoadError, WillNotFit) as exc:
        print(f"octoflux: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if need is not None:
        log.info(
            "memory: about %.1f GB needed on %s (weights and working memory%s)",
            need.device_bytes / 2**30,
            device,
            f"; {saved}" if saved else "",
        )


def _check_entry(settings: Settings, entry) -> str:
    """One `--model` entry's source, checked (and its transformer file); `ModelLoadError` otherwise."""
    from octoflux.pipelines.loader import check_model_source, check_transformer_base, model_source

    source = model_source(entry.source, settings.tiny_dir)
    check_model_source(source)
    if entry.transformer_file:
        from octoflux.pipelines.single_file import check_transformer_file

        check_transformer_base(source)
        check_transformer_file(entry.transformer_file, source, settings.optimize, settings.quantize)
    if settings.text_encoder_2:
        from octoflux.pipelines.text_encoder_file import FLAG, check_text_encoder_file

        check_transformer_base(source, FLAG)
        check_text_encoder_file(settings.text_encoder_2, source, settings.quantize)
    return source


def check_state_store(settings: Settings) -> None:
    """A bad --state-url or a damaged store stops the server before anything starts, with one line."""
    from octoflux.state.integrity import check_state
    from octoflux.state.store import StateStoreError, open_state_store

    try:
        check_state(settings.resolved_state_url, repair=settings.state_repair)
        open_state_store(settings.resolved_state_url).close()
    except StateStoreError as exc:
        print(f"octoflux: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check_keys_file(settings: Settings) -> None:
    """A malformed --api-keys-file stops the server before anything starts, with one line."""
    from octoflux.core.tenants import KeysFileError, parse_keys_file

    if settings.api_keys_file is None:
        return
    try:
        parse_keys_file(settings.api_keys_file)
    except KeysFileError as exc:
        print(f"octoflux: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    import uvicorn

    from octoflux.deploy.log_setup import configure_logging, quiet_libraries

    settings.check_auth_exposure()
    check_keys_file(settings)
    check_model_paths(settings)
    # The cheap checks first: a bad flag, key file, model path or state store costs no library import.
    configure_logging(settings, libraries=False)
    check_state_store(settings)
    quiet_libraries()
    preflight(settings)
    layout = _context_parallel_layout(settings)
    if settings.uses_ray:
        from octoflux.deploy.replicas import serve_replicas

        return serve_replicas(settings)
    from octoflux.api.common.request_log import configure_access_log
    from octoflux.app import create_app
    from octoflux.deploy.shutdown import GracefulServer

    configure_access_log()
    ranks = _start_ranks(settings) if layout is not None else None
    app = create_app(settings, ranks.engine_factory) if ranks else create_app(settings)
    # log_config=None: uvicorn's records go through our handler (and its filter), not its own.
    # uvicorn's own access log would be a second, unstructured line per request.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = GracefulServer(config, app)
    # SIGHUP re-reads --api-keys-file (a file that no longer parses is logged; the old keys stay),
    # on a thread: a handler runs between the event loop's bytecodes and must not block it.
    keys = app.state.service.keys
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=keys.reload, daemon=True).start())
    announcer = threading.Thread(
        target=_announce, args=(app.state.service, server, settings), name="octoflux-ready", daemon=True
    )
    announcer.start()
    if ranks:
        ranks.stop_server_when_lost(server, app.state.service)
    try:
        server.run()
    finally:
        if ranks:
            ranks.stop()
    if app.state.service.load_error is not None or (ranks and ranks.lost_reason):
        raise SystemExit(1)


def _context_parallel_layout(settings: Settings):
    """--context-parallel's layout checked against the model and GPUs (a bad one: one line, exit 2);
    None for one process."""
    from octoflux.pipelines.parallel import parse_layout

    if parse_layout(settings.context_parallel) is None:
        return None
    from octoflux.deploy.context_parallel import checked_layout

    return checked_layout(settings)


def _start_ranks(settings: Settings):
    from octoflux.deploy.context_parallel import RankGroup

    return RankGroup.start(settings)


def _announce(service, server, settings: Settings) -> None:
    """Say "ready on URL" once the model is loaded and warm; if loading fails, say why and stop."""
    while not service.wait_ready(0.2):
        if service.load_error is not None:
            log.error("%s; stopping", service.load_error)
            server.should_exit = True
            return
        if service.readiness().status == "shutting down":
            return
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("ready on http://%s:%d", host, settings.port)


TINY_VARIANTS = ("dev", "schnell", "kontext", "fill", "safety-checker")


def make_tiny(directory: Path, variant: str = "dev", concept_threshold: float = 1.0) -> None:
    if variant == "safety-checker":
        from octoflux.pipelines.safety import write_tiny_safety_checker

        path = write_tiny_safety_checker(directory, concept_threshold)
        print(f"wrote the tiny safety checker (concept threshold {concept_threshold}) to {path}")
        return
    from octoflux.pipelines.tiny import write_tiny_checkpoint

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


def _export_parser(sub) -> None:
    from octoflux.pipelines.export_formats import FORMATS, LAYOUTS

    export = sub.add_parser(
        "export-transformer",
        help="write a diffusers folder's transformer as one GGUF, fp8 or bf16 file (for --transformer)",
    )
    export.add_argument("folder", type=Path, help="a diffusers-format FLUX folder")
    export.add_argument("file", type=Path, help="the file to write (.gguf or .safetensors)")
    export.add_argument("--format", choices=FORMATS, default="gguf:Q8_0", help="default: gguf:Q8_0")
    export.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="bfl",
        help="tensor names: BFL's (default), ComfyUI's or diffusers'",
    )


def _export_text_encoder_parser(sub) -> None:
    from octoflux.pipelines.export_formats import FORMATS

    export = sub.add_parser(
        "export-text-encoder",
        help="write a diffusers folder's T5 encoder as one GGUF, fp8 or bf16 file (for --text-encoder-2)",
    )
    export.add_argument("folder", type=Path, help="a diffusers-format FLUX folder")
    export.add_argument("file", type=Path, help="the file to write (.gguf or .safetensors)")
    export.add_argument("--format", choices=FORMATS, default="fp8", help="default: fp8")


def export_text_encoder(folder: Path, file: Path, file_format: str) -> None:
    from octoflux.pipelines.export import ExportError
    from octoflux.pipelines.export import export_text_encoder as export

    try:
        path = export(folder, file, file_format)
    except ExportError as exc:
        print(f"octoflux: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {folder}'s T5 encoder as {file_format} to {path}")


def export_transformer(folder: Path, file: Path, file_format: str, layout: str) -> None:
    from octoflux.pipelines.export import ExportError
    from octoflux.pipelines.export import export_transformer as export

    try:
        path = export(folder, file, file_format, layout)
    except ExportError as exc:
        print(f"octoflux: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {folder}'s transformer as {file_format} ({layout} layout) to {path}")


def main(argv: list[str] | None = None) -> None:
    parser, source = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(source, args)
        except ValidationError as exc:  # argparse's usage line and exit code 2, not a traceback
            source.root_parser.error("; ".join(_flag_error(error) for error in exc.errors()))
        serve(settings)
    elif args.command == "export-transformer":
        export_transformer(args.folder, args.file, args.format, args.layout)
    elif args.command == "export-text-encoder":
        export_text_encoder(args.folder, args.file, args.format)
    else:
        make_tiny(args.dir, args.variant, args.concept_threshold)


if __name__ == "__main__":
    sys.exit(main())
