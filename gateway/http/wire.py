"""The listener's wire forms: status lines, the Date header, answer heads, error answers.

Kept apart from the connection so the byte layout of an answer lives in one place.
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from http import HTTPStatus

from multidict import CIMultiDict

# The problem+json vocabulary of `gateway.problems`, which sits a layer above
# (it builds aiohttp answers): the listener's own refusals use the same form.
PROBLEM_TYPE_BASE = "urn:quota-gateway:problem:"

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# Header fields the listener frames itself, dropped from what a handler passed.
DROP_FOR_LENGTH: tuple[str, ...] = ("content-length", "transfer-encoding", "connection")
DROP_FOR_STREAM: tuple[str, ...] = ("transfer-encoding", "connection")  # keeps a Content-Length
DROP_FOR_UPGRADE: tuple[str, ...] = ("content-length", "transfer-encoding")  # keeps Connection

_status_lines: dict[int, str] = {}
_date_second = -1
_date_field = ""


def status_line(status: int, reason: str) -> str:
    """`HTTP/1.1 404 Not Found\\r\\n`; the reason is empty for a code HTTPStatus lacks."""
    if reason:
        if "\r" in reason or "\n" in reason:
            raise ValueError("a reason phrase holds CR or LF")
        return f"HTTP/1.1 {status} {reason}\r\n"
    line = _status_lines.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _status_lines[status] = f"HTTP/1.1 {status} {phrase}\r\n"
    return line


def date_field() -> str:
    """The `Date` header line, formatted once per second."""
    global _date_second, _date_field
    now = time.time()
    if int(now) != _date_second:
        _date_second = int(now)
        _date_field = f"Date: {formatdate(_date_second, usegmt=True)}\r\n"
    return _date_field


def encode_head(
    status: int, reason: str, headers: CIMultiDict[str], drop: tuple[str, ...], framing: str
) -> bytes:
    """An answer's head: the status line, the handler's headers except `drop`, a Date
    unless given, then `framing` (the listener's own Content-Length/Connection lines).

    Raises ValueError when a header would split the head (CR or LF in it).
    """
    if not headers and not reason:
        line = _status_lines.get(status) or status_line(status, "")
        return f"{line}{date_field()}{framing}\r\n".encode()
    for name in drop:
        if name in headers:
            fields = [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in drop]
            break
    else:
        fields = [f"{k}: {v}\r\n" for k, v in headers.items()]
    given = "".join(fields)
    # One CRLF per field, so any other CR or LF came from a name or a value.
    if given.count("\n") != len(fields) or given.count("\r") != len(fields):
        raise ValueError("a response header holds CR or LF")
    date = "" if "date" in headers else date_field()
    # The same encoding the upstream client decodes with, so upstream bytes survive.
    return f"{status_line(status, reason)}{given}{date}{framing}\r\n".encode(
        "utf-8", "surrogateescape"
    )


def frame_chunk(data: bytes) -> bytes:
    """One chunk of a `Transfer-Encoding: chunked` body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def problem_answer(status: int, kind: str, detail: str, fields: str = "") -> bytes:
    """A whole problem+json answer that closes the connection (the listener's own errors);
    `fields` are more header lines (each ending in CRLF)."""
    title = HTTPStatus(status).phrase
    body = json.dumps(
        {"type": PROBLEM_TYPE_BASE + kind, "title": title, "status": status, "detail": detail}
    ).encode()
    framing = (
        "Content-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{fields}"
    )
    return encode_head(status, "", CIMultiDict(), (), framing) + body
