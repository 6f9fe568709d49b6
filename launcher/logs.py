"""One log format for the whole process: ours, uvicorn's and the embedded broker's loggers.

``--log-format text`` (the default) keeps the line operators read today,
``2026-05-09 07:35:25,123 INFO proxy.server: message``, with any structured fields appended
as ``key=value``. ``--log-format json`` writes one JSON object per line (docs/OPERATIONS.md,
"Logs"): ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``msg``, then the
record's structured fields (``device``, ``peer``, ``code``, ... passed as ``extra=``), and
``exc`` with the traceback when there is one.

uvicorn configures its own loggers and handlers unless it is given a logging config: the
same dictionary configures the root logger here (:func:`configure`) and is handed to uvicorn
(:func:`uvicorn_log_config`), so its "Started server process" line comes out in our format.
With ``api --workers N`` uvicorn spawns fresh interpreters and applies that dictionary in
each, which is why it names the formatter by import path rather than by object.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.config
import sys
import time
from typing import Any, Literal

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")

# Attributes every LogRecord has: everything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    # uvicorn adds an ANSI-coloured copy of the message for its own formatter.
    "color_message",
}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The classic line, then the record's structured fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        parts = [line.split("\n", 1)[0]]
        for key, value in fields.items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            parts.append(f"{key}={json.dumps(text) if not text or ' ' in text else text}")
        rest = line.split("\n", 1)[1:]  # a traceback stays after the fields
        return " ".join(parts) + ("\n" + rest[0] if rest else "")


_FORMATTERS = {"text": "launcher.logs.TextFormatter", "json": "launcher.logs.JsonFormatter"}
# What configure() applied last: uvicorn gets the same (a copy: it may write into it).
_applied: dict[str, Any] | None = None
_format: LogFormat = "text"


def logging_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` dictionary: one handler on the root logger (stderr,
    as before), and uvicorn's loggers without handlers of their own, propagating to it."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LEVELS)}, not {level!r}")
    name = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": _FORMATTERS[log_format]}},
        "handlers": {
            "main": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": name, "handlers": ["main"]},
        "loggers": {
            logger: {"handlers": [], "propagate": True, "level": name}
            for logger in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
        },
    }


def configure(log_format: LogFormat, level: str) -> None:
    """Apply the format and level to the whole process (called once by the launcher).
    Python warnings go through logging too, so they take the format as well."""
    global _applied, _format
    config = logging_config(log_format, level)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    _applied, _format = config, log_format


def uvicorn_log_config() -> dict[str, Any] | None:
    """For ``uvicorn.Config(log_config=...)``: the configuration :func:`configure` applied,
    or None when it never ran (tests that start the API in-process: uvicorn then leaves
    logging alone and its records propagate to whatever the test set up)."""
    return copy.deepcopy(_applied) if _applied is not None else None


def report(line: str) -> None:
    """A start-up failure's one line on stderr, in the configured format: a JSON log reader
    gets a JSON object for it too."""
    if _format == "json":
        record = logging.LogRecord("coap_bridge", logging.ERROR, "", 0, line, None, None)
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(line, file=sys.stderr)
