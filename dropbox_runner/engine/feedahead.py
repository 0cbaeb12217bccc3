"""Feed-ahead: render chat templates and tokenize the lines of every task of the model process in
one thread (a fast tokenizer shared by threads raises "Already borrowed"), from the moment a task's
order arrives (while the engine still loads), so the feeding loop hands token ids to the engine; and
the order in which a window's worth of lines is fed, grouped by prefix.

It only prepares: the feeding loop still validates every line and falls back to tokenizing a line
itself when the feed-ahead has not reached it. Results are the same either way (same tokenizer,
same template; tests/test_vllm.py compares them with vLLM's own run_batch). One budget of prepared
lines serves the whole process, split evenly between the tasks.
"""

from __future__ import annotations

import logging
import threading
from array import array
from pathlib import Path
from typing import Any

from dropbox_runner import protocol as p
from dropbox_runner.engine.base import RequestRejected
from dropbox_runner.lines.parse import IdSet, Request, iter_raw_lines, parse_line

log = logging.getLogger("dropbox_runner.worker")

AHEAD_LINES = 50_000  # prepared lines kept at most in the whole process (token ids as 4-byte arrays)
PREFIX_TOKENS = 1024  # how much of a prompt decides its place in a group
CHUNK = 32  # lines prepared for one task before the thread looks at the others


class _AnyIds(IdSet):
    """Duplicate ids are the feeding loop's to find; here every line is prepared."""

    def add(self, custom_id: str) -> bool:
        return True


class _Source:
    """One task's lines being prepared."""

    def __init__(self, order: p.TaskOrder) -> None:
        self.order = order
        self.cache: dict[int, list[array] | RequestRejected] = {}
        self.consumed = -1
        self.done = False
        self.prepared = 0
        self.lines = None  # opened by the thread
        self.file = None
        self.ids = _AnyIds()


class FeedAhead:
    def __init__(self, tokenizer: Any, limit: int = AHEAD_LINES) -> None:
        self.tokenizer, self.limit = tokenizer, limit
        self.sources: dict[str, _Source] = {}
        self.stopped = False
        self.prepared = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="feed-ahead", daemon=True).start()

    def add(self, order: p.TaskOrder) -> None:
        with self._cond:
            self.sources.setdefault(order.task_id, _Source(order))
            self._cond.notify_all()

    def has(self, task_id: str) -> bool:
        with self._cond:
            return task_id in self.sources

    def remove(self, task_id: str) -> int:
        """Forget a task that ended; returns how many of its lines were prepared."""
        with self._cond:
            src = self.sources.pop(task_id, None)
            self._cond.notify_all()
        if src is None:
            return 0
        src.cache.clear()
        src.done = True
        return src.prepared

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self.sources.clear()
            self._cond.notify_all()

    def _next_source(self) -> _Source | None:
        """The task with the fewest prepared lines that is still below its part of the budget."""
        share = self.limit // max(1, len(self.sources))
        open_ = [s for s in self.sources.values() if not s.done and len(s.cache) < share]
        return min(open_, key=lambda s: len(s.cache), default=None)

    def _run(self) -> None:
        from dropbox_runner.engine.vllm_engine import prompt_ids

        while True:
            with self._cond:
                src = self._next_source()
                while src is None and not self.stopped:
                    self._cond.wait(0.5)
                    src = self._next_source()
                if self.stopped:
                    return
            try:
                self._prepare(src, prompt_ids)
            except Exception:  # the feeding loop tokenizes by itself: slower, same results
                log.exception("feed-ahead stopped for %s", src.order.task_id)
                src.done = True
            if src.done and src.file is not None:
                src.file.close()

    def _prepare(self, src: _Source, prompt_ids) -> None:
        order = src.order
        if src.lines is None:
            src.file = open(Path(order.input), "rb")  # noqa: SIM115 (closed when the source is done)
            if order.shard_at is not None:  # a copy's shard: read from the checkpoint before it
                offset, line, index = order.shard_at
                src.file.seek(offset)
                src.lines = iter_raw_lines(src.file, offset, index, line - 1)
            else:
                src.lines = iter_raw_lines(src.file)
        start, end = order.shard or (0, float("inf"))
        defaults = tuple(order.defaults)
        for _ in range(CHUNK):
            if len(src.cache) >= self.limit // max(1, len(self.sources)):
                return  # its part of the budget is full
            raw = next(src.lines, None)
            if raw is None or raw.index >= end or src.done:
                src.done = True
                return
            if raw.index <= src.consumed or raw.index < start:
                continue  # the feeding loop is past it, or another copy's line
            req = parse_line(raw, src.ids, defaults)
            if not isinstance(req, Request) or req.kind == "embedding":
                continue
            try:
                value: list[array] | RequestRejected = [
                    array("i", x) for x in prompt_ids(self.tokenizer, req)
                ]
            except RequestRejected as exc:
                value = exc
            with self._cond:
                if raw.index > src.consumed and not src.done:
                    src.cache[raw.index] = value
                    src.prepared += 1
                    self.prepared += 1

    def take(self, task_id: str, index: int) -> list[list[int]] | None:
        """The token ids of line `index` of a task if prepared; lines are taken in order. A line the
        engine will refuse is left to it (it tokenizes that one again and says why)."""
        with self._cond:
            src = self.sources.get(task_id)
            if src is None:
                return None
            src.consumed = max(src.consumed, index)
            value = src.cache.pop(index, None)
            self._cond.notify()
        if value is None or isinstance(value, RequestRejected):
            return None
        return [x.tolist() for x in value]


def window_order(item: tuple[int, str, Any]) -> tuple:
    """Sort key of a line in a window: priority first, then adapter (model), then prompt prefix, so
    the prefix cache serves the prompts that share one; lines without ids keep their place last."""
    priority, adapter, ids = item
    return (-priority, adapter, 0 if ids else 1, ids[0][:PREFIX_TOKENS] if ids else [])
