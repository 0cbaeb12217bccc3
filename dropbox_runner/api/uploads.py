"""`POST /v1/files`: the multipart form read as it streams, whatever the transfer encoding.

Bytes are counted as they arrive, the file part goes straight into its staging file under
state/api/files/ (never the system temp folder), and the form's other parts are small (FIELD_LIMIT
bytes in all, their headers included). Every refusal is an UploadRefused, answered as a 4xx.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import anyio
import python_multipart
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

FIELD_LIMIT = 64 * 1024


class UploadRefused(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def too_large(limit: int) -> UploadRefused:
    return UploadRefused(413, f"the upload is larger than {limit} bytes", code="file_too_large")


async def receive(request: Any, store: Any, limit: int) -> dict[str, Any]:
    """Read the form of `request` into `store` (a worker thread writes; the event loop only reads)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 2 * FIELD_LIMIT:
        raise too_large(limit)
    form = Form(request.headers.get("content-type", ""), limit)
    stream = request.stream()

    def body() -> Iterator[bytes]:
        while True:
            try:
                yield anyio.from_thread.run(stream.__anext__)
            except StopAsyncIteration:
                return
            except ClientDisconnect:
                raise UploadRefused(400, "the client went away before the upload ended") from None

    return await anyio.to_thread.run_sync(form.save, body(), store)


class Form:
    """A push parser's events turned into: the fields so far, and the file's data as it comes."""

    def __init__(self, content_type: str, limit: int) -> None:
        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data" or not options.get(b"boundary"):
            raise UploadRefused(400, "the upload must be multipart/form-data with a boundary")
        self.limit, self.received, self.small = limit, 0, 0
        self.fields: dict[str, str] = {}
        self.filename: str | None = None  # set when the file part's headers are read
        self.file_data: deque[bytes] = deque()
        self.file_ended = self.ended = False
        self._part: dict[str, Any] = {}
        self._header = [b"", b""]
        callbacks = {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_field": lambda d, s, e: self._header_bytes(0, d[s:e]),
            "on_header_value": lambda d, s, e: self._header_bytes(1, d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_end": lambda: setattr(self, "ended", True),
        }
        self.parser = python_multipart.MultipartParser(options[b"boundary"], callbacks)

    def save(self, body: Iterator[bytes], store: Any) -> dict[str, Any]:
        self.body = body
        while self.filename is None:
            self._check_purpose()
            if not self._feed():
                raise UploadRefused(400, "a `file` part is required", param="file")
        try:
            return store.save_upload(self._file(), self.filename, "batch", self.limit)
        except ValueError:
            raise too_large(self.limit) from None

    def _file(self) -> Iterator[bytes]:
        """The file part's bytes; then the rest of the form is read and checked (a refusal raised
        here discards the staged file)."""
        while self.file_data or not self.file_ended:
            if self.file_data:
                yield self.file_data.popleft()
            elif not self._feed():
                raise UploadRefused(400, "the upload ended inside its file part", param="file")
        while self._feed():
            pass
        if not self.ended:
            raise UploadRefused(400, "the form ends before its closing boundary")
        self._check_purpose(required=True)

    def _feed(self) -> bool:
        """Parse one more chunk of the body; False at its end."""
        chunk = next(self.body, None)
        if chunk is None:
            return False
        self.received += len(chunk)
        if self.received > self.limit + 2 * FIELD_LIMIT:
            raise too_large(self.limit)
        try:
            self.parser.write(chunk)
        except python_multipart.exceptions.FormParserError:
            raise UploadRefused(400, "the upload is not a valid multipart form") from None
        return True

    def _check_purpose(self, required: bool = False) -> None:
        purpose = self.fields.get("purpose")
        if (required or purpose is not None) and purpose != "batch":
            raise UploadRefused(400, "purpose must be 'batch'", param="purpose")

    # -- the parser's callbacks --------------------------------------------------------------------
    def _count_small(self, n: int, what: str) -> None:
        self.small += n
        if self.small > FIELD_LIMIT:
            raise UploadRefused(
                413, f"the form's {what} are larger than {FIELD_LIMIT} bytes (only the file may be large)"
            )

    def _begin(self) -> None:
        self._part = {"headers": {}, "data": bytearray(), "file": False}

    def _header_bytes(self, which: int, data: bytes) -> None:
        self._count_small(len(data), "part headers")
        self._header[which] += data

    def _header_end(self) -> None:
        self._part["headers"][self._header[0].lower()] = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self._part["name"] = name
            return
        if name != "file" or self.filename is not None:
            raise UploadRefused(400, "the form may hold one file part, named `file`", param="file")
        self._part["file"] = True
        self.filename = options[b"filename"].decode("utf-8", "replace")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part["file"]:
            self.file_data.append(data[start:end])
        else:
            self._count_small(end - start, f"field {self._part['name'][:40]!r} and other fields")
            self._part["data"] += data[start:end]

    def _end(self) -> None:
        if self._part["file"]:
            self.file_ended = True
        else:
            self.fields[self._part["name"]] = self._part["data"].decode("utf-8", "replace")
