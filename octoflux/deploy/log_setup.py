"""`configure_logging(settings)`: a few readable lines on stderr, and no prompt in any of them.

Prompts reach the log only through the access log's `prompt` field, which a request asks for with
`log_prompt`. Libraries can leak them on their own (diffusers warns "The following part of your
input was truncated ...: <the prompt's tail>"), so every library record and Python warning passes
one filter: the few that matter are said once in our words, the rest are dropped below ERROR, and
any record that quotes truncated input is never written as it is. Progress bars are turned off.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings

from octoflux.settings import Settings

# Loggers whose records are ours; every other logger is a library's.
OWN_LOGGERS = ("octoflux", "benchmarks", "__main__")
LIBRARY_LOGGERS = (
    "diffusers", "transformers", "tokenizers", "huggingface_hub", "accelerate", "peft", "torch", "torchao",
    "PIL", "urllib3", "httpx", "py.warnings", "uvicorn", "uvicorn.error", "multipart",
)  # fmt: skip
# A library message that quotes input text. Matched on the unformatted template and on the message.
QUOTES_INPUT = re.compile(r"part of your input was truncated|input was truncated|truncated because", re.I)
# (pattern, our words): library warnings worth a line, said once per process.
TRANSLATIONS = (
    (
        QUOTES_INPUT,
        "a prompt was longer than a text encoder's token limit (CLIP reads 77 tokens, T5 up to 512); "
        "the rest was not used for that encoder",
    ),
)
FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


def _is_own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


class LibraryFilter(logging.Filter):
    """Translate the library warnings that matter (once each), drop the rest below ERROR, never leak input."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_own(record.name):
            return True
        text = self._text(record)
        for pattern, words in TRANSLATIONS:
            if pattern.search(text):
                return self._once(record, words)
        if QUOTES_INPUT.search(text):  # belt and braces: a future message that quotes input
            return False
        return self.verbose or record.levelno >= logging.ERROR

    @staticmethod
    def _text(record: logging.LogRecord) -> str:
        try:
            return f"{record.msg}\n{record.getMessage()}"
        except Exception:  # a malformed library record: judge it by its template alone
            return str(record.msg)

    def _once(self, record: logging.LogRecord, words: str) -> bool:
        with self._lock:
            if words in self._said:
                return False
            self._said.add(words)
        record.msg, record.args, record.exc_info, record.exc_text = words, None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_libraries() -> None:
    """Route the libraries' own handlers through ours and switch their progress bars off."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch  # noqa: F401  (torch configures its loggers on import; ours come after)

    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    for library in ("diffusers", "transformers"):
        try:
            module = __import__(f"{library}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        module.disable_default_handler()
        module.enable_propagation()
        module.disable_progress_bar()
        module.set_verbosity_warning()  # warnings still reach the filter, to be translated or dropped
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # e.g. torch's own stderr handler
            logger.removeHandler(handler)
        logger.propagate = True
    # Libraries that warn through `warnings` go through the same filter.
    logging.captureWarnings(True)
    warnings.simplefilter("default")


def configure_logging(
    settings: Settings | None = None, stream=None, verbose: bool = False, libraries: bool = True
) -> logging.Handler:
    """Install one stderr handler with the prompt-safe filter on the root logger; returns it.

    `libraries=False` leaves torch, diffusers and transformers unimported (and unconfigured): call
    `quiet_libraries()` before anything imports them. The CLI's cheap startup checks run in between."""
    if libraries:
        quiet_libraries()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(LibraryFilter(verbose=verbose))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler
