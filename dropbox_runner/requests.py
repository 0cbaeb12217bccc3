"""Input lines in the OpenAI Batch format: streaming reader and per-line validation.

Used by intake (to count and reject), by `validate`, and by the model process (to run).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any, BinaryIO

import orjson

URLS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
MAX_LINE_BYTES = 32 * 1024 * 1024
MAX_N = 128
BOM = b"\xef\xbb\xbf"
FULL_CHECK_LINES = 10_000  # lines the daemon checks when it takes a file (the model process checks all)

# Fields that change generation and that we map to the engine.
HONOURED = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logprobs",
        "top_logprobs",
        "response_format",
    }
)
# vLLM's own sampling extras, passed through as its OpenAI server takes them.
VLLM_EXTRAS = frozenset(
    {
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "stop_token_ids",
        "bad_words",
        "allowed_token_ids",
        "logit_bias",
        "truncate_prompt_tokens",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
    }
)
# Fields that do not change generation.
INFORMATIONAL = frozenset(
    {
        "model",
        "user",
        "metadata",
        "store",
        "service_tier",
        "stream_options",
        "encoding_format",
        "parallel_tool_calls",
        "request_id",
        "priority",
    }
)
PAYLOAD = {"chat": "messages", "completion": "prompt", "embedding": "input"}
SAMPLING_FOR = {"chat", "completion"}


@dataclass(slots=True)
class Request:
    index: int  # position among non-blank lines: line `index` of every output file answers it
    line: int  # 1-based physical line in the file, for people
    custom_id: str
    kind: str  # chat | completion | embedding
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


def iter_raw_lines(f: BinaryIO, start_offset: int = 0) -> Iterator[RawLine]:
    """Non-blank lines with their positions; CRLF and a leading BOM accepted; over-long lines flagged."""
    index = 0
    line = 0
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


def _check_number(body: dict, key: str, lo: float | None, hi: float | None, integer: bool) -> str | None:
    if key not in body or body[key] is None:
        return None
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        return (
            f"`{key}` must be {'an integer' if integer else 'a number'}, got {orjson.dumps(v).decode()[:40]}"
        )
    if lo is not None and v < lo:
        return f"`{key}` must be at least {lo}, got {v}"
    if hi is not None and v > hi:
        return f"`{key}` must be at most {hi}, got {v}"
    return None


NUMBER_RULES: dict[str, tuple[float | None, float | None, bool]] = {
    "max_tokens": (1, None, True),
    "max_completion_tokens": (1, None, True),
    "temperature": (0, 2, False),
    "top_p": (0, 1, False),
    "top_k": (-1, None, True),
    "min_p": (0, 1, False),
    "n": (1, MAX_N, True),
    "seed": (None, None, True),
    "presence_penalty": (-2, 2, False),
    "frequency_penalty": (-2, 2, False),
    "repetition_penalty": (0, None, False),
    "top_logprobs": (0, 20, True),
    "min_tokens": (0, None, True),
}


ALLOWED = {
    kind: INFORMATIONAL | {payload} | (HONOURED | VLLM_EXTRAS if kind in SAMPLING_FOR else frozenset())
    for kind, payload in PAYLOAD.items()
}


def _check_body(kind: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) of the first problem of a body, or None."""
    payload = PAYLOAD[kind]
    if payload not in body:
        return payload, f"body has no `{payload}`"
    value = body[payload]
    if kind == "chat":
        if not isinstance(value, list) or not value:
            return payload, "`messages` must be a non-empty list"
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return f"messages[{i}]", "each message must be an object with a `role`"
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                return f"messages[{i}].content", "`content` must be a string or a list of parts"
    elif kind == "completion":
        if not isinstance(value, str) and not (
            isinstance(value, list) and value and all(isinstance(p, str) for p in value)
        ):
            return payload, "`prompt` must be a string or a non-empty list of strings"
    else:
        if not isinstance(value, str) and not (
            isinstance(value, list) and value and all(isinstance(p, str) for p in value)
        ):
            return payload, "`input` must be a string or a non-empty list of strings"
        if body.get("dimensions") is not None:
            return "dimensions", "`dimensions` is not supported: the model's full embedding is returned"
    allowed = ALLOWED[kind]
    for key in body:
        if key not in allowed:
            return key, f"`{key}` is not supported for {kind} requests and would change the result"
        rule = NUMBER_RULES.get(key)
        if rule is not None:
            problem = _check_number(body, key, *rule)
            if problem:
                return key, problem
    if body.get("stream"):
        return "stream", "`stream` cannot be used in a batch"
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        return "stop", "`stop` must be a string or a list of strings"
    rf = body.get("response_format")
    if rf is not None:
        rtype = rf.get("type") if isinstance(rf, dict) else None
        if rtype not in ("text", "json_object", "json_schema"):
            return "response_format", "`response_format.type` must be text, json_object or json_schema"
        if rtype == "json_schema" and not isinstance((rf.get("json_schema") or {}).get("schema"), dict):
            return "response_format", "`response_format.json_schema.schema` must be an object"
    return None


def parse_line(raw: RawLine, seen: IdSet, defaults: tuple[dict[str, Any], ...] = ()) -> Request | LineError:
    """Check one line; `defaults` (manifest's, then model's) fill generation fields the body leaves out."""
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
        return LineError(raw.index, raw.line, cid, f"duplicate custom_id {cid!r}", "custom_id")
    method = obj.get("method", "POST")
    if method != "POST":
        return LineError(raw.index, raw.line, cid, "`method` must be POST", "method")
    url = obj.get("url")
    kind = URLS.get(url)
    if kind is None:
        return LineError(
            raw.index,
            raw.line,
            cid,
            f"unknown url {url!r}; use one of {', '.join(URLS)}",
            "url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(raw.index, raw.line, cid, "line has no `body` object", "body")
    if defaults and kind in SAMPLING_FOR:
        body = merged_body(
            body, *({k: v for k, v in d.items() if k in HONOURED | VLLM_EXTRAS} for d in defaults)
        )
    problem = _check_body(kind, body)
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


def summarize(path: Path, keep_errors: int = 100) -> FileSummary:
    """One streaming pass: counts, sha256, the first errors, and whether the text is UTF-8."""
    import hashlib

    summary = FileSummary()
    digest = hashlib.sha256()
    # Duplicate custom_ids are left to the model process (they fail in place there): remembering
    # every id here would make the daemon's memory grow with the file.
    seen = _NoIds()
    with open(path, "rb") as f:
        for raw in iter_raw_lines(_Hashing(f, digest)):
            summary.total += 1
            if raw.data is not None and summary.not_utf8_line is None:
                try:
                    raw.data.decode("utf-8")
                except UnicodeDecodeError:
                    summary.not_utf8_line = raw.line
            if summary.total > FULL_CHECK_LINES and summary.valid:
                continue  # past the first lines, only the count and the hash matter here
            result = parse_line(raw, seen)
            if isinstance(result, Request):
                summary.valid += 1
            elif len(summary.errors) < keep_errors:
                summary.errors.append(result)
        f.seek(0)
    summary.sha256 = digest.hexdigest()
    return summary


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
