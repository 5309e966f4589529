"""How a process logs: every record in one format (JSON lines or text) on stderr,
and the buffered stream the access log writes to stdout."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import TextIO

from gateway.config.models import LoggingConfig

# A JSON string literal, quotes included, in ASCII: quotes, backslashes, control
# characters and everything past ASCII escaped (C code: ~0.1 µs for a path), so a
# client's bytes can never break a line, start a new one or reach a terminal raw.
json_string: Callable[[str], str] = encode_basestring_ascii

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]
_seconds: dict[int, str] = {}  # the current second's text: one entry


def timestamp(epoch_s: float) -> str:
    """RFC 3339 in UTC with milliseconds; each second's text is formatted once."""
    whole = int(epoch_s)
    text = _seconds.get(whole)
    if text is None:
        _seconds.clear()
        text = _seconds[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return text + _MILLIS[int((epoch_s - whole) * 1000)]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message (and exc, a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`2026-05-01T12:00:00.123Z INFO gateway: message`, the traceback on the lines after."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        head = f"{timestamp(record.created)} {record.levelname} {record.name}: "
        return head + super().format(record)


def configure(config: LoggingConfig, stream: TextIO | None = None) -> None:
    """Send every log record of the process to `stream` (stderr) in the configured format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[config.level])


class LineBuffer:
    """Lines kept in memory and written together: once `flush_interval_s` after the
    first one waits, as soon as `max_chars` wait, and on `flush` (at shutdown).

    A write per line would cost a system call per request. Until a flush the
    lines are only in this process: a SIGKILL loses at most the last interval's.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        flush_interval_s: float = 0.05,
        max_chars: int = 64 * 1024,
    ) -> None:
        self._stream = stream  # None: sys.stdout, as it is when flushed
        self._interval_s = flush_interval_s
        self._max_chars = max_chars
        self._lines: list[str] = []
        self._chars = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, line: str) -> None:
        """Queue `line` (ending with a newline)."""
        self._lines.append(line)
        self._chars += len(line)
        if self._chars >= self._max_chars:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self._interval_s, self.flush)

    def flush(self) -> None:
        """Write what waits now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "".join(self._lines)
        self._lines.clear()
        self._chars = 0
        stream = self._stream or sys.stdout
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or gone: the lines are lost, serving goes on
