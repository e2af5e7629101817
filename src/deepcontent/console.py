"""What a ``deepcontent`` command shows on the console, and where everything else goes.

The CLI calls :func:`configure` once, from its ``-v`` / ``-q`` / ``--log-format`` options:

* log lines of the ``deepcontent`` logger go to stderr, as text (``HH:MM:SS message``) or, with
  ``--log-format json``, one JSON object per line (``time``, ``level``, ``logger``, ``message``,
  ``exc_info`` when there is a traceback); every line passes through :mod:`deepcontent.redact`;
* ``-v``: DEBUG lines, and Spark and Ray print on the console as they always did;
* by default the engines are quiet: Ray workers' stdout / stderr stay in Ray's session logs
  (``ray.init(log_to_driver=False)``; ``ray.log_to_driver`` overrides), the Ray driver's own log
  lines and everything the Spark JVM prints (log4j at INFO, Python workers' stderr) go to files
  in :func:`engine_log_dir`, and only their errors reach the console, one line each; where the
  files are is logged once per engine;
* long local loops (:class:`deepcontent.manifest.Progress`) draw a progress bar when stderr is
  a terminal, the format is text and the level shows INFO; periodic log lines otherwise.

Nothing here runs unless called: a program that uses the library without :func:`configure`
gets the engines' own console output, as before.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from deepcontent.redact import RedactingFilter, redact_text

LOGGER = "deepcontent"
LOG_FORMATS = ("text", "json")
LOG_DIR_ENV = "DEEPCONTENT_LOG_DIR"


@dataclass
class ConsoleSettings:
    configured: bool = False
    level: int = logging.INFO
    log_format: str = "text"
    verbose: bool = False
    quiet_engines: bool = False


_settings = ConsoleSettings()
_log_dir: Path | None = None
_announced: set[str] = set()
_active_bars = 0


# ----------------------------------------------------------------------------- formatters
class TextFormatter(logging.Formatter):
    """``HH:MM:SS message``; a line from another library's logger (Ray's) names it and its level."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        if record.name == LOGGER or record.name.startswith(LOGGER + "."):
            return super().formatMessage(record)
        return f"{record.asctime} {record.name} {record.levelname}: {record.message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    and ``exc_info`` (the traceback text) when the record carries one. Text is redacted again
    here, so a handler without :class:`~deepcontent.redact.RedactingFilter` leaks nothing."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = redact_text(record.exc_text)
        return json.dumps(out, ensure_ascii=False)


class ConsoleHandler(logging.StreamHandler):
    """stderr as it is when a line is written (a redirected ``sys.stderr`` too); an active
    progress bar is cleared for the line and drawn again under it."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # noqa: D102 - StreamHandler's attribute, looked up at emit time
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if _active_bars:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=self.stream):
                super().emit(record)
        else:
            super().emit(record)


class _ToConsole(logging.Handler):
    """Hands an engine logger's records at or above its level to the ``deepcontent`` console
    handler (same format, same redaction). Its own formatter is never used, so an engine that
    resets its loggers' formatters (``ray.init``) changes nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger(LOGGER).handlers:
            if isinstance(handler, ConsoleHandler) and record.levelno >= handler.level:
                handler.handle(record)


# ----------------------------------------------------------------------------- set-up
def setup_logging(level: int = logging.INFO, *, fmt: str = "text") -> None:
    """Log lines of the ``deepcontent`` logger on stderr at ``level``, as ``fmt`` (``text``:
    ``HH:MM:SS stage: message``; ``json``: one object per line), redacted. Called again, it
    changes the level and format of the one handler it installed."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    root = logging.getLogger(LOGGER)
    handler = next((h for h in root.handlers if isinstance(h, ConsoleHandler)), None)
    if handler is None:
        handler = ConsoleHandler()
        handler.addFilter(RedactingFilter())  # no log line carries a secret
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.setLevel(level)
    root.propagate = False
    warnings_logger = logging.getLogger("py.warnings")
    if fmt == "json":  # Python warnings as JSON lines too, not bare text among them
        logging.captureWarnings(True)
        if not any(isinstance(h, _ToConsole) for h in warnings_logger.handlers):
            warnings_logger.addHandler(_ToConsole())
        warnings_logger.propagate = False
    _settings.configured, _settings.level, _settings.log_format = True, level, fmt


def configure(*, verbose: bool = False, quiet: bool = False, log_format: str = "text") -> ConsoleSettings:
    """The CLI's console: DEBUG with ``verbose`` (which wins over ``quiet``), warnings only with
    ``quiet``, INFO otherwise; the engines quiet unless ``verbose``."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    setup_logging(level, fmt=log_format)
    _settings.verbose = verbose
    _settings.quiet_engines = not verbose
    return _settings


def settings() -> ConsoleSettings:
    return _settings


def engines_quiet() -> bool:
    """Whether Spark's and Ray's own output goes to files (the CLI without ``-v``)."""
    return _settings.quiet_engines


def progress_bars_enabled() -> bool:
    """Bars for :class:`~deepcontent.manifest.Progress`: only under :func:`setup_logging`, text
    format, INFO shown, and stderr a terminal."""
    if not _settings.configured or _settings.log_format != "text":
        return False
    if not logging.getLogger(LOGGER).isEnabledFor(logging.INFO):
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # closed or replaced by something that is no stream
        return False


def bar_opened() -> None:
    global _active_bars
    _active_bars += 1


def bar_closed() -> None:
    global _active_bars
    _active_bars = max(0, _active_bars - 1)


# ----------------------------------------------------------------------------- engine logs
def engine_log_dir() -> Path:
    """This process's folder for the engines' log files, made on first use:
    ``$DEEPCONTENT_LOG_DIR``, else ``<temp dir>/deepcontent-<user>/logs/<time>-<pid>``."""
    global _log_dir
    if _log_dir is None:
        root = os.environ.get(LOG_DIR_ENV)
        if root:
            path = Path(root)
        else:
            try:
                user = getpass.getuser()
            except Exception:  # noqa: BLE001 - a container user without a passwd entry
                user = str(os.getuid())
            path = (Path(tempfile.gettempdir()) / f"deepcontent-{user}" / "logs"
                    / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        path.mkdir(parents=True, exist_ok=True)
        _log_dir = path
    return _log_dir


def announce(engine: str, message: str) -> None:
    """Log ``message`` (where ``engine``'s logs are) once per process, at INFO."""
    if engine not in _announced:
        _announced.add(engine)
        logging.getLogger(LOGGER).info("logs: %s", message)


def route_to_files(logger_name: str, filename: str | None, *, console_level: int = logging.ERROR) -> None:
    """Take an engine's Python logger off the console: its console handlers are removed; records
    at ``console_level`` and above still reach the console through the ``deepcontent`` handler,
    every record goes to ``filename`` in :func:`engine_log_dir` (when given)."""
    logger = logging.getLogger(logger_name)
    for handler in list(logger.handlers):
        if isinstance(handler, _ToConsole) or (isinstance(handler, logging.StreamHandler)
                                                and not isinstance(handler, logging.FileHandler)):
            logger.removeHandler(handler)
    logger.addHandler(_ToConsole(level=console_level))
    if filename:
        path = engine_log_dir() / filename
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in logger.handlers):
            file_handler = logging.FileHandler(path, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- %(message)s"))
            file_handler.addFilter(RedactingFilter())
            logger.addHandler(file_handler)
