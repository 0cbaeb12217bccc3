"""One task in the model process: its lines (bad ones and known poison fail on the way), the parts
of a culprit hunt it runs alone, its log or a copy's shard sink, what it has in flight, and how a
finished request becomes a result line.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from dropbox_runner import protocol as p
from dropbox_runner.engine.base import Finished
from dropbox_runner.engine.fairness import Share
from dropbox_runner.engine.shardsink import ShardSink
from dropbox_runner.lines.parse import IdSet, LineError, Request, iter_raw_lines, parse_line
from dropbox_runner.results.log import ResultLog
from dropbox_runner.results.records import error_line, failure_line, request_ids, success_line

POISON_MESSAGE = (
    "this request crashed the model process, alone, after crashing it in a batch; it was not run again"
)


class TaskRun:
    """One task in the model process: its lines, its log, what it has in flight."""

    def __init__(self, order: p.TaskOrder) -> None:
        self.order, self.key = order, order.task_id
        self.share = Share(order.task_id, order.group, order.priority)
        self.defaults = tuple(order.defaults)
        self.log: ResultLog | ShardSink | None = None  # opened by `open`, with its lock
        self.timeout = order.request_timeout_seconds
        self.started: dict[int, tuple[float, str]] = {}  # timed requests in flight: start, custom_id
        self.in_flight: set[int] = set()
        self.answered = False  # a result came in this process (the first is committed at once)
        self.waiting = 0  # lines taken for the window and not yet handed to the engine
        self.outcome = "completed"
        self.trials = deque(order.trials)  # a culprit hunt's parts still to run: [first, last] lines
        self.trial: list[int] | None = None  # the part running now: only its lines are given
        self._part: deque[Request] = deque()  # its lines not yet taken
        self._held: deque[Request] = deque()  # lines read past while hunting: they run after the hunt
        self._lines = None
        self._next: Request | None = None
        self.exhausted = False

    def open(self, send) -> p.Resumed:
        order = self.order
        if order.shard is None:
            self.log = ResultLog(Path(order.log), order.total)
        else:  # a copy running a shard for the daemon: results go back up the pipe
            self.log = ShardSink(
                order.total, order.shard[0], order.shard[1], send, order.task_id, order.shard_done
            )
        recovery = self.log.recover()
        self.log.mark_started()
        self._lines = self._requests()
        return p.Resumed(kept=recovery.kept, notes=recovery.notes, task_id=self.key)

    def peek(self) -> Request | None:
        if self.trial is not None:
            return self._part[0] if self._part else None
        return self._held[0] if self._held else self._read()

    def take(self) -> Request:
        """The next line, taken for the window: it waits there until the engine has it."""
        self.waiting += 1
        if self.trial is not None:
            return self._part.popleft()
        if self._held:
            return self._held.popleft()
        req, self._next = self._next, None
        return req

    def _read(self) -> Request | None:
        if self._next is None and not self.exhausted:
            self._next = next(self._lines, None)
            self.exhausted = self._next is None
        return self._next

    @property
    def hunting(self) -> bool:
        return self.trial is not None or bool(self.trials)

    def next_part(self) -> list[int] | None:
        """Start the hunt's next part (None once none is left): until its lines are taken, they are
        the only ones the task gives; lines read past on the way wait for the end of the hunt."""
        self.trial = self.trials.popleft() if self.trials else None
        if self.trial is not None:
            first, last = self.trial
            while (req := self._read()) is not None and req.index <= last:
                self._next = None
                (self._part if req.index >= first else self._held).append(req)
        return self.trial

    @property
    def finished(self) -> bool:
        """Every line ran: none left to read, none waiting in the window or held back by a hunt,
        none in the engine."""
        return (
            self.exhausted and not self.waiting and not self.in_flight and not self.hunting and not self._held
        )

    def progress(self, engine_preemptions: int | None = None) -> p.Progress:
        m = self.log.marker
        return p.Progress(
            m.count, m.failed, m.completion_tokens, m.started_at, m.updated_at, self.key, engine_preemptions
        )

    def _requests(self):
        """The task's lines still to run, in input order; bad lines and known poison fail on the way."""
        done, seen, poison, task = self.log.done, IdSet(), set(self.order.poison), self.order
        with open(task.input, "rb") as f:
            lines = iter_raw_lines(f)
            if task.shard is not None:  # a copy's shard: read from the checkpoint before it to its end
                offset, line, index = task.shard_at
                f.seek(offset)
                lines = iter_raw_lines(f, offset, index, line - 1)
            for raw in lines:
                if task.shard is not None and (raw.index >= task.shard[1] or done[raw.index]):
                    if raw.index >= task.shard[1]:
                        return
                    continue  # not this copy's line (repeated ids are the daemon's to fail)
                parsed = parse_line(raw, seen, self.defaults)
                if done[raw.index]:
                    continue
                if isinstance(parsed, LineError):
                    self.record_line_error(parsed)
                elif raw.index in poison:
                    self.record_failure(raw.index, parsed.custom_id, "engine_crash", POISON_MESSAGE)
                else:
                    yield parsed

    def _ids(self, index: int) -> tuple[str, str]:
        self.started.pop(index, None)
        return request_ids(self.order.job_id, self.order.model, index)

    def record(self, fin: Finished) -> None:
        if self.log.done[fin.index]:  # already failed by its timeout
            return
        ids = self._ids(fin.index)
        if fin.status_code == 200:
            payload = success_line(fin.custom_id, fin.body, ids)
            self.log.append(
                fin.index, True, fin.prompt_tokens, fin.completion_tokens, payload, fin.cached_tokens
            )
        else:
            err = fin.error or {}
            payload = error_line(
                fin.custom_id,
                fin.status_code,
                err.get("message", "request failed"),
                ids,
                type=err.get("type", "invalid_request_error"),
                param=err.get("param"),
                code=err.get("code"),
            )
            self.log.append(fin.index, False, 0, 0, payload)

    def record_line_error(self, e: LineError) -> None:
        ids = self._ids(e.index)
        payload = error_line(e.custom_id, 400, f"line {e.line}: {e.message}", ids, param=e.param, code=e.code)
        self.log.append(e.index, False, 0, 0, payload)

    def record_failure(self, index: int, custom_id: str, code: str, message: str) -> None:
        payload = failure_line(custom_id, code, message, self._ids(index))
        self.log.append(index, False, 0, 0, payload)
