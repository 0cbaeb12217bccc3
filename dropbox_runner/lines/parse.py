"""Input lines in the OpenAI Batch format: streaming reader and total per-line validation.

Used by intake (to count and reject), by `validate`, and by the model process (to run).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from dropbox_runner.fsutil import open_regular
from dropbox_runner.lines.fields import HONOURED, SAMPLING_FOR, VLLM_EXTRAS, check_body, quote
from dropbox_runner.lines.responses import to_chat
from dropbox_runner.lines.scoring import SCORING_KINDS, check_scoring

URLS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "response",
    "/v1/score": "score",  # and the other paths vLLM's server routes to its scoring
    "/v1/rerank": "rerank",
    "/score": "score",
    "/rerank": "rerank",
    "/v2/rerank": "rerank",
}
SHOWN_URLS = ", ".join(u for u in URLS if u.startswith("/v1/"))
MAX_LINE_BYTES = 32 * 1024 * 1024
BOM = b"\xef\xbb\xbf"
FULL_CHECK_LINES = 10_000  # lines the daemon checks when it takes a file (the model process checks all)


@dataclass(slots=True)
class Request:
    index: int  # position among non-blank lines: line `index` of every output file answers it
    line: int  # 1-based physical line in the file, for people
    custom_id: str
    # chat | completion | embedding | response (its body already the chat it amounts to) | score | rerank
    kind: str
    body: dict[str, Any]


@dataclass(slots=True)
class LineError:
    index: int
    line: int
    custom_id: str | None
    message: str
    param: str | None = None
    code: str = "invalid_request"


@dataclass(slots=True)
class RawLine:
    index: int
    line: int
    data: bytes | None  # None: the line was longer than MAX_LINE_BYTES
    offset: int = 0


def iter_raw_lines(f: BinaryIO, start_offset: int = 0, index: int = 0, line: int = 0) -> Iterator[RawLine]:
    """Non-blank lines with their positions; CRLF and a leading BOM accepted; over-long lines flagged.

    To start in the middle of a file, seek to `start_offset` and give the index and physical line
    number of the line before it there.
    """
    offset = start_offset
    while True:
        chunk = f.readline(MAX_LINE_BYTES + 1)
        if not chunk:
            return
        line += 1
        start = offset
        offset += len(chunk)
        if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):  # skip the rest of the over-long line
                chunk = f.readline(1 << 20)
                offset += len(chunk)
            yield RawLine(index, line, None, start)
            index += 1
            continue
        if line == 1 and chunk.startswith(BOM):
            chunk = chunk[3:]
        data = chunk.strip()
        if not data:
            continue
        yield RawLine(index, line, data, start)
        index += 1


class IdSet:
    """The custom_ids seen so far, kept as 8-byte digests so a million lines cost tens of MB, not hundreds."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def add(self, custom_id: str) -> bool:
        """Add; False if it was already there."""
        key = blake2b(custom_id.encode(), digest_size=8).digest()
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def parse_line(raw: RawLine, seen: IdSet, defaults: tuple[dict[str, Any], ...] = ()) -> Request | LineError:
    """Check one line; `defaults` (manifest's, then model's) fill generation fields the body leaves out.

    Total: any bytes give a Request or a LineError, never an exception.
    """
    if raw.data is None:
        return LineError(raw.index, raw.line, None, f"line is longer than {MAX_LINE_BYTES} bytes")
    try:
        obj = orjson.loads(raw.data)
    except orjson.JSONDecodeError as exc:
        return LineError(raw.index, raw.line, None, f"line is not valid JSON ({str(exc).split(':')[0]})")
    if not isinstance(obj, dict):
        return LineError(raw.index, raw.line, None, "line must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(raw.index, raw.line, None, "line has no `custom_id` string", "custom_id")
    if not seen.add(cid):
        return LineError(raw.index, raw.line, cid, f"duplicate custom_id {quote(cid)}", "custom_id")
    if obj.get("method", "POST") != "POST":
        return LineError(
            raw.index, raw.line, cid, f"`method` must be POST, got {quote(obj.get('method'))}", "method"
        )
    url = obj.get("url")
    kind = URLS.get(url) if isinstance(url, str) else None
    if kind is None:
        return LineError(
            raw.index, raw.line, cid, f"unknown url {quote(url)}; use one of {SHOWN_URLS}", "url"
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(raw.index, raw.line, cid, "line has no `body` object", "body")
    if kind == "response":  # runs as the chat request it amounts to; answered as a Response
        chat = to_chat(body)
        if isinstance(chat, tuple):
            return LineError(raw.index, raw.line, cid, chat[1], chat[0])
        body = chat
    if defaults and kind in SAMPLING_FOR:
        body = merged_body(
            body, *({k: v for k, v in d.items() if k in HONOURED | VLLM_EXTRAS} for d in defaults)
        )
    if kind in SCORING_KINDS:
        problem = check_scoring(kind, body)
    else:
        problem = check_body("chat" if kind == "response" else kind, body)
    if problem:
        return LineError(raw.index, raw.line, cid, problem[1], problem[0])
    return Request(raw.index, raw.line, cid, kind, body)


@dataclass
class FileSummary:
    total: int = 0
    valid: int = 0  # valid lines among the first FULL_CHECK_LINES (or until one is found)
    sha256: str = ""
    errors: list[LineError] = field(default_factory=list)
    not_utf8_line: int | None = None


def summarize(path: Path, keep_errors: int | None = 100, *, whole: bool = False) -> FileSummary:
    """One streaming pass: counts, sha256, the first errors, and whether the text is UTF-8.

    The daemon checks the first FULL_CHECK_LINES lines and leaves duplicate custom_ids to the model
    process (remembering every id would make its memory grow with the file); `whole` checks all.
    """
    import hashlib

    summary = FileSummary()
    digest = hashlib.sha256()
    seen = IdSet() if whole else _NoIds()
    with open_regular(path) as f:
        for raw in iter_raw_lines(_Hashing(f, digest)):
            summary.total += 1
            result: Request | LineError
            if raw.data is not None and not _is_utf8(raw.data):
                summary.not_utf8_line = summary.not_utf8_line or raw.line
                result = LineError(raw.index, raw.line, None, "not UTF-8 text")
            elif not whole and summary.total > FULL_CHECK_LINES and summary.valid:
                continue  # past the first lines, only the count and the hash matter here
            else:
                result = parse_line(raw, seen)
            if isinstance(result, Request):
                summary.valid += 1
            elif keep_errors is None or len(summary.errors) < keep_errors:
                summary.errors.append(result)
    summary.sha256 = digest.hexdigest()
    return summary


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _NoIds(IdSet):
    def add(self, custom_id: str) -> bool:
        return True


class _Hashing:
    """A read-through wrapper that feeds every byte read to a digest."""

    def __init__(self, f: BinaryIO, digest: Any) -> None:
        self._f, self._digest = f, digest

    def readline(self, limit: int = -1) -> bytes:
        data = self._f.readline(limit)
        self._digest.update(data)
        return data


def merged_body(body: dict[str, Any], *defaults: dict[str, Any]) -> dict[str, Any]:
    """The line's body wins, then each defaults mapping in order."""
    merged = dict(body)
    for d in defaults:
        for k, v in d.items():
            merged.setdefault(k, v)
    return merged
