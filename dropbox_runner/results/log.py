"""The append-only result log of one (job, model) task, with group commit and a durable marker.

Record: `<index> <O|E> <prompt_tokens> <completion_tokens> <cached_tokens> <crc32> <json>\n` (logs
of the first round have `o|e` and no cached count, and still read); the marker holds the committed
byte length, so everything before it is durable and everything after it is discarded.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from dropbox_runner.fsutil import staged, write_atomic
from dropbox_runner.layout import fed_mark_of, marker_of


class Marker(BaseModel):
    """What is durable in a log: its first `bytes` bytes, holding `count` results."""

    bytes: int = 0
    count: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    started_at: float | None = None
    updated_at: float | None = None


def marker_path(log_path: Path) -> Path:
    return marker_of(log_path)


def read_marker(log_path: Path) -> Marker | None:
    try:
        return Marker.model_validate_json(marker_path(log_path).read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def fed_mark_path(log_path: Path) -> Path:
    return fed_mark_of(log_path)


def read_fed_mark(log_path: Path) -> int:
    """The highest line index the model process had handed to its engine (-1 if none)."""
    try:
        data = fed_mark_path(log_path).read_bytes()
    except FileNotFoundError:
        return -1
    return struct.unpack("<q", data[:8])[0] if len(data) >= 8 else -1


def encode_record(
    index: int, ok: bool, prompt_tokens: int, completion_tokens: int, payload: bytes, cached_tokens: int = 0
) -> bytes:
    crc = zlib.crc32(payload)
    flag = b"O" if ok else b"E"
    return b"%d %s %d %d %d %08x %s\n" % (
        index,
        flag,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        crc,
        payload,
    )


@dataclass(slots=True)
class Record:
    index: int
    ok: bool
    prompt_tokens: int
    completion_tokens: int
    payload: bytes
    offset: int
    end: int
    cached_tokens: int = 0


def decode_record(line: bytes, offset: int) -> Record | None:
    """The record of one full line, or None if it is torn or corrupt."""
    if not line.endswith(b"\n"):
        return None
    space = line.find(b" ")
    new = line[space + 1 : space + 2] in (b"O", b"E")
    parts = line[:-1].split(b" ", 6 if new else 5)
    if len(parts) != (7 if new else 6):
        return None
    try:
        index, flag, pt, ct = int(parts[0]), parts[1], int(parts[2]), int(parts[3])
        cached = int(parts[4]) if new else 0
        crc = int(parts[-2], 16)
    except ValueError:
        return None
    payload = parts[-1]
    if flag not in (b"O", b"E", b"o", b"e") or zlib.crc32(payload) != crc:
        return None
    return Record(index, flag in (b"O", b"o"), pt, ct, payload, offset, offset + len(line), cached)


def iter_records(path: Path, limit: int | None = None) -> Iterator[Record | None]:
    """Records up to `limit` bytes; yields None once at the first torn or corrupt one, then stops."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        offset = 0
        for line in f:
            if limit is not None and offset + len(line) > limit:
                if offset < limit:
                    yield None
                return
            rec = decode_record(line, offset)
            yield rec
            if rec is None:
                return
            offset = rec.end


@dataclass
class Recovery:
    """What recovery found and did, in words for the log."""

    kept: int = 0
    dropped_bytes: int = 0
    notes: list[str] = field(default_factory=list)


class ResultLog:
    """Writer side: one per task, guarded by an exclusive flock the kernel drops when the process dies."""

    def __init__(self, path: Path, total: int, *, blocking_lock: bool = True) -> None:
        self.path = path
        self.total = total
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if blocking_lock else fcntl.LOCK_NB))
        self.done = bytearray(total)
        self.marker = Marker()
        self._pending: list[bytes] = []
        self._pending_stats = [0, 0, 0, 0, 0]  # count, failed, prompt, completion, cached
        # Two locks, so that the feeding loop's append never waits for a commit's write and fsync
        # (it did: every commit interval stalled the engine for one fsync, eight with eight tasks).
        self._io_lock = threading.Lock()  # one commit at a time; freeze and close wait for it
        self._buffer_lock = threading.Lock()  # the results not yet committed
        self.closed = False
        # The highest line fed to the engine, in a shared page: one memory store per request, no
        # system call, and the daemon can still read it after this process is killed.
        fed_fd = os.open(fed_mark_path(path), os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fed_fd, 8)
        self._fed = mmap.mmap(fed_fd, 8)
        os.close(fed_fd)
        self._fed_max = -1
        self._fed[:8] = struct.pack("<q", -1)

    def fed(self, index: int) -> None:
        if index > self._fed_max:
            self._fed_max = index
            struct.pack_into("<q", self._fed, 0, index)

    # -- recovery -------------------------------------------------------------------------------
    def recover(self) -> Recovery:
        """Truncate to the marker, check every committed record, rebuild the done set and totals."""
        rec = Recovery()
        marker = read_marker(self.path) or Marker()
        size = os.fstat(self._fd).st_size
        limit = marker.bytes
        if size > limit:
            rec.notes.append(f"dropped {size - limit} uncommitted bytes after the marker")
        elif size < limit:
            rec.notes.append(f"marker says {limit} bytes but the log holds {size}; kept its valid records")
            limit = size
        m = Marker(started_at=marker.started_at)
        end = 0
        for r in iter_records(self.path, limit):
            if r is None:
                rec.notes.append(f"torn or corrupt record at byte {end}; log cut there")
                break
            if r.index >= self.total or self.done[r.index]:
                rec.notes.append(f"record for line {r.index} is out of range or repeated; log cut there")
                break
            self.done[r.index] = 1
            m.count += 1
            m.failed += 0 if r.ok else 1
            m.prompt_tokens += r.prompt_tokens
            m.completion_tokens += r.completion_tokens
            m.cached_tokens += r.cached_tokens
            end = r.end
        rec.dropped_bytes = size - end
        rec.kept = m.count
        m.bytes = end
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        self.marker = m
        if marker.bytes != end or marker.count != m.count:
            self._write_marker()
        return rec

    # -- writing --------------------------------------------------------------------------------
    def append(
        self,
        index: int,
        ok: bool,
        prompt_tokens: int,
        completion_tokens: int,
        payload: bytes,
        cached: int = 0,
    ) -> None:
        """Buffer one result; it becomes durable at the next commit."""
        data = encode_record(index, ok, prompt_tokens, completion_tokens, payload, cached)
        with self._buffer_lock:
            self._pending.append(data)
            s = self._pending_stats
            s[0] += 1
            s[1] += 0 if ok else 1
            s[2] += prompt_tokens
            s[3] += completion_tokens
            s[4] += cached
        self.done[index] = 1

    def commit(self) -> bool:
        """Write, fsync, then move the marker. Returns whether anything new became durable."""
        with self._io_lock:
            if self.closed:
                return False
            with self._buffer_lock:
                pending, self._pending = self._pending, []
                stats, self._pending_stats = self._pending_stats, [0, 0, 0, 0, 0]
            if not pending:
                return False
            data = b"".join(pending)
            os.lseek(self._fd, self.marker.bytes, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
            m = self.marker
            m.bytes += len(data)
            m.count += stats[0]
            m.failed += stats[1]
            m.prompt_tokens += stats[2]
            m.completion_tokens += stats[3]
            m.cached_tokens += stats[4]
            m.updated_at = time.time()
            if m.started_at is None:
                m.started_at = m.updated_at
            self._write_marker()
            return True

    def mark_started(self) -> None:
        if self.marker.started_at is None:
            self.marker.started_at = time.time()

    def _write_marker(self) -> None:
        write_atomic(marker_path(self.path), self.marker.model_dump_json().encode())

    def freeze(self) -> None:
        """Stop all further writes for good (the process is about to die)."""
        self._io_lock.acquire()
        self.closed = True

    def close(self) -> None:
        with self._io_lock:
            self.closed = True
            os.close(self._fd)
            self._fed.close()


def committed_records(path: Path) -> Iterator[Record]:
    """Every committed, intact record of a log (stops at the marker or the first bad record)."""
    marker = read_marker(path)
    if marker is None:
        return
    for r in iter_records(path, marker.bytes):
        if r is None:
            return
        yield r


def missing_between(path: Path, first: int, last: int) -> list[int]:
    """The line indexes from `first` to `last` without a committed result, in order."""
    done = {r.index for r in committed_records(path) if first <= r.index <= last}
    return [i for i in range(first, last + 1) if i not in done]


def first_missing(path: Path) -> int:
    """The lowest line index without a committed result (the count if none is missing)."""
    seen = sorted(r.index for r in committed_records(path))
    for expected, index in enumerate(seen):
        if index != expected:
            return expected
    return len(seen)


def rewrite_without_failures(path: Path, total: int) -> int:
    """For retry: keep only successful records (under the log's lock), so failed lines run again."""
    log = ResultLog(path, total)
    try:
        log.recover()
        kept = [r for r in committed_records(path) if r.ok]
        dropped = log.marker.count - len(kept)
        size = 0
        # The new log first, then its marker: a crash between leaves a marker past the log's end,
        # and recovery keeps the log's intact records.
        with staged(path) as f:
            for r in kept:
                size += f.write(
                    encode_record(
                        r.index, True, r.prompt_tokens, r.completion_tokens, r.payload, r.cached_tokens
                    )
                )
        m = Marker(
            bytes=size,
            count=len(kept),
            started_at=log.marker.started_at,
            prompt_tokens=sum(r.prompt_tokens for r in kept),
            completion_tokens=sum(r.completion_tokens for r in kept),
            cached_tokens=sum(r.cached_tokens for r in kept),
        )
        write_atomic(marker_path(path), m.model_dump_json().encode())
        return dropped
    finally:
        log.close()
