"""Feed-ahead: render chat templates and tokenize a task's lines in a thread of the model process,
from the moment its order arrives (while the engine still loads), so the feeding loop hands token
ids to the engine; and the order in which a window's worth of lines is fed, grouped by prefix.

It only prepares: the feeding loop still validates every line and falls back to tokenizing a line
itself when the feed-ahead has not reached it. Results are the same either way (same tokenizer,
same template; tests/test_vllm.py compares them with vLLM's own run_batch).
"""

from __future__ import annotations

import logging
import threading
from array import array
from pathlib import Path
from typing import Any

from dropbox_runner import protocol as p
from dropbox_runner.engine.base import RequestRejected
from dropbox_runner.lines import IdSet, Request, iter_raw_lines, parse_line

log = logging.getLogger("dropbox_runner.worker")

AHEAD_LINES = 50_000  # prepared lines kept at most (token ids as 4-byte arrays)
PREFIX_TOKENS = 1024  # how much of a prompt decides its place in a group


class _AnyIds(IdSet):
    """Duplicate ids are the feeding loop's to find; here every line is prepared."""

    def add(self, custom_id: str) -> bool:
        return True


class FeedAhead:
    def __init__(self, tokenizer: Any, order: p.TaskOrder, limit: int = AHEAD_LINES) -> None:
        self.tokenizer, self.order, self.limit = tokenizer, order, limit
        self.cache: dict[int, list[array] | RequestRejected] = {}
        self.consumed = -1
        self.stopped = False
        self.prepared = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="feed-ahead", daemon=True).start()

    def matches(self, order: p.TaskOrder) -> bool:
        return (order.job_id, order.model, order.input) == (
            self.order.job_id,
            self.order.model,
            self.order.input,
        )

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self.cache.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        from dropbox_runner.engine.vllm_engine import prompt_ids

        tokenizer = self.tokenizer
        try:
            defaults = tuple(self.order.defaults)
            start, end = self.order.shard or (0, float("inf"))
            ids = _AnyIds()
            with open(Path(self.order.input), "rb") as f:
                for raw in iter_raw_lines(f):
                    with self._cond:
                        while len(self.cache) >= self.limit and not self.stopped:
                            self._cond.wait(0.5)
                        if self.stopped:
                            return
                        if raw.index <= self.consumed or not start <= raw.index < end:
                            continue  # the feeding loop is past it, or another copy's line
                    req = parse_line(raw, ids, defaults)
                    if not isinstance(req, Request) or req.kind == "embedding":
                        continue
                    try:
                        value: list[array] | RequestRejected = [
                            array("i", x) for x in prompt_ids(tokenizer, req)
                        ]
                    except RequestRejected as exc:
                        value = exc
                    with self._cond:
                        if raw.index > self.consumed and not self.stopped:
                            self.cache[raw.index] = value
                            self.prepared += 1
        except Exception:  # the feeding loop tokenizes by itself: slower, same results
            log.exception("feed-ahead stopped")

    def take(self, index: int) -> list[list[int]] | None:
        """The token ids of line `index` if prepared; lines are taken in order. A line the engine will
        refuse is left to it (it tokenizes that one again and says why)."""
        with self._cond:
            self.consumed = max(self.consumed, index)
            value = self.cache.pop(index, None)
            self._cond.notify()
        if value is None or isinstance(value, RequestRejected):
            return None
        return [x.tolist() for x in value]


def grouped(batch: list[tuple[Request, Any]]) -> list[tuple[Request, Any]]:
    """A window's lines in the order that lets the prefix cache serve them: prompts that share a
    prefix side by side (lexicographic order of their first tokens). Lines without ids keep their place
    at the end."""
    with_ids = [item for item in batch if item[1]]
    without = [item for item in batch if not item[1]]
    with_ids.sort(key=lambda item: item[1][0][:PREFIX_TOKENS])
    return with_ids + without
