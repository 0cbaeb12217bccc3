"""Where a copy of a model sends its results when it runs a shard of a task for the daemon (several
copies of a model on one job): back up the pipe, every commit interval, instead of into the log.

The daemon is then the one writer of the task's log; it appends what copies send and moves the
marker itself. Same interface as the part of `ResultLog` that the feeding loop uses.
"""

from __future__ import annotations

import threading
import time

from dropbox_runner import protocol as p
from dropbox_runner.results.log import Marker, Recovery


class ShardSink:
    def __init__(self, total: int, start: int, end: int, send, task_id: str = "", done=()) -> None:
        self.done = bytearray(b"\x01") * total  # lines outside the shard are not this copy's
        self.done[start:end] = bytes(end - start)
        for index in done:  # a shard given back: what the daemon has already is not run again
            self.done[index] = 1
        self.marker = Marker()
        self.path = f"shard {start}-{end}"
        self._send = send
        self.task_id = task_id
        self._pending: list[list] = []
        self._lock = threading.Lock()

    def recover(self) -> Recovery:
        return Recovery()

    def mark_started(self) -> None:
        self.marker.started_at = time.time()

    def fed(self, index: int) -> None:
        pass  # the daemon knows the shard it leased

    def append(self, index: int, ok: bool, pt: int, ct: int, payload: bytes, cached: int = 0) -> None:
        """Keep one result (prompt, completion and cached tokens) for the next commit's message."""
        with self._lock:
            self._pending.append([index, ok, pt, ct, cached, payload.decode()])
        self.done[index] = 1

    def commit(self) -> bool:
        """Send what was added since the last commit (waits for room in the pipe: nothing is dropped)."""
        with self._lock:
            records, self._pending = self._pending, []
        if records:
            self._send(p.Results(records, self.task_id))
        return bool(records)

    def freeze(self) -> None:
        pass

    def close(self) -> None:
        pass
