"""The feeding loop of a model process: every task it holds, one engine, one window.

Each task keeps its own log (or a copy's shard sink), its own timeouts, cancel and outcome. Lines
are chosen for the window by `fairness` (strict priority, then completion tokens group by group),
and a window's worth is fed ordered by priority, adapter and prompt prefix. One committer thread
makes every task's results durable each commit interval, and a task's first result at once (a job's
first result, after a preemption say, does not wait up to an interval for it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any

from dropbox_runner import protocol as p
from dropbox_runner.engine.base import Engine, Finished, RequestRejected
from dropbox_runner.engine.fairness import Fairness
from dropbox_runner.engine.feedahead import FeedAhead, window_order
from dropbox_runner.engine.taskrun import TaskRun
from dropbox_runner.lines.parse import Request

log = logging.getLogger("dropbox_runner.worker")

ENGINE_ERROR = "the engine raised an error on this request: {}"


class Worker:
    """Runs the tasks the daemon sends, together, until told to stop.

    `lifeline` gives the commands (`commands`, a queue), holds the logs to freeze if the daemon dies
    (`logs`) and ends the process group (`die`); `channel` takes events (`send`, `offer`).
    """

    def __init__(
        self, engine: Engine, channel, lifeline, ahead: FeedAhead | None, group: bool = True
    ) -> None:
        self.engine, self.channel, self.lifeline, self.ahead = engine, channel, lifeline, ahead
        self.group = group and ahead is not None  # grouping by prefix needs the token ids ahead
        self.tasks: dict[str, TaskRun] = {}
        self.fair = Fairness()
        self.staged: deque[tuple[TaskRun, Request, Any, int]] = deque()  # composed, not yet fed
        self.interval = 0.2
        self.draining_until: float | None = None  # a stop with grace: no new line, in flight may end
        self._stop = threading.Event()
        self._firsts: queue.SimpleQueue[TaskRun] = queue.SimpleQueue()  # first results, to commit now
        self._wake = threading.Event()  # set with each of them, and at the stop
        self._tasks_lock = threading.Lock()
        self._committer = threading.Thread(target=self._commit_loop, name="committer", daemon=True)
        self._committer.start()

    # -- commands ----------------------------------------------------------------------------------
    def serve(self) -> None:
        """Until a Stop for the whole process; every task ends committed with its TaskDone."""
        try:
            while self._commands():
                self._fill()
                if self.engine.in_flight:
                    self._collect()
                for task in [t for t in self.tasks.values() if t.finished]:
                    self._end(task, task.outcome)
        finally:
            self._stop.set()
            self._wake.set()

    def _commands(self, block: bool = True) -> bool:
        """Carry out the commands that arrived; False once the process is to stop."""
        idle = block and not self.tasks and not self.engine.in_flight
        while True:
            try:
                cmd = self.lifeline.commands.get(timeout=1.0) if idle else self.lifeline.commands.get_nowait()
            except queue.Empty:
                return self._drained()
            idle = False
            if isinstance(cmd, p.Run):
                self._add(cmd.task)
            elif isinstance(cmd, p.Cancel):
                for task in self._named(cmd.task_id):
                    self._end(task, "cancelled", abort=True)
            elif isinstance(cmd, p.Stop) and cmd.task_id:
                for task in self._named(cmd.task_id):
                    self._end(task, "interrupted", abort=True)
            elif isinstance(cmd, p.Stop):
                if cmd.grace_seconds > 0 and self.engine.in_flight:
                    self.draining_until = time.monotonic() + cmd.grace_seconds
                    self._unstage(lambda task: True)
                    continue
                self._stop_all()
                return False

    def _drained(self) -> bool:
        """During a stop with grace: True while requests in flight may still finish."""
        if self.draining_until is None:
            return True
        if self.engine.in_flight and time.monotonic() < self.draining_until:
            return True
        self._stop_all()
        return False

    def _stop_all(self) -> None:
        for task in list(self.tasks.values()):
            self._end(task, "interrupted", abort=True)

    def _named(self, task_id: str) -> list[TaskRun]:
        if not task_id:
            return list(self.tasks.values())
        return [self.tasks[task_id]] if task_id in self.tasks else []

    def _add(self, order: p.TaskOrder) -> None:
        if order.task_id in self.tasks:
            return  # sent again (the process was reloaded): it runs already
        refused = self.engine.refuses(order.model)  # an adapter the engine cannot serve fails alone
        if refused is not None:
            if self.ahead is not None:
                self.ahead.remove(order.task_id)
            self.channel.send(p.TaskDone("failed", order.task_id, refused[:600]))
            return
        task = TaskRun(order)
        self.interval = order.commit_interval_ms / 1000
        resumed = task.open(self.channel.send)
        self.lifeline.logs.add(task.log)
        self.channel.send(resumed)
        with self._tasks_lock:
            self.tasks[task.key] = task

    def _end(self, task: TaskRun, outcome: str, abort: bool = False) -> None:
        if abort:
            for index in list(task.in_flight):
                self.engine.abort(index, task.key)  # only this task's requests
            task.in_flight.clear()
            task.started.clear()
            task.exhausted = True
            self.fair.forget(task.share)
            self._unstage(lambda t: t is task)
        with self._tasks_lock:
            self.tasks.pop(task.key, None)
        if self.ahead is not None:
            prepared = self.ahead.remove(task.key)
            if prepared:
                log.info("feed-ahead prepared %d lines of %s", prepared, task.key)
        self._commit(task)
        self.lifeline.logs.discard(task.log)
        task.log.close()
        if task.order.shard is None:
            self.channel.send(task.progress(self.engine.preemptions))
        self.channel.send(p.TaskDone(outcome, task.key))

    # -- commits -----------------------------------------------------------------------------------
    def _commit(self, task: TaskRun) -> bool:
        try:
            return task.log.commit()
        except OSError as exc:  # disk full, I/O error: what is committed stays; stop here
            self.channel.send(p.IoError(f"cannot write {task.log.path}: {exc.strerror or exc}", task.key))
            self.lifeline.die()
            return False

    def _commit_loop(self) -> None:
        deadline = time.monotonic() + self.interval
        # The next commit is due one interval after the start of the last, not after its end; a
        # task's first result is committed when it comes, and leaves the interval as it was.
        while True:
            woken = self._wake.wait(max(0.0, deadline - time.monotonic()))
            if self._stop.is_set():
                return
            if woken:
                self._wake.clear()
                self._commit_each(self._first_results())
                if time.monotonic() < deadline:
                    continue
            deadline = time.monotonic() + self.interval
            with self._tasks_lock:
                tasks = list(self.tasks.values())
            self._commit_each(tasks)

    def _first_results(self) -> list[TaskRun]:
        """The tasks whose first result came since the last look, still held (an ended task's log is
        committed and closed by `_end`)."""
        firsts = []
        while not self._firsts.empty():
            firsts.append(self._firsts.get())
        with self._tasks_lock:
            return [t for t in firsts if self.tasks.get(t.key) is t]

    def _commit_each(self, tasks: list[TaskRun]) -> None:
        for task in tasks:
            if self._commit(task) and task.order.shard is None:
                self.channel.offer(task.progress(self.engine.preemptions))

    # -- feeding -----------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Feed staged lines while the window has room; compose the next window when none is staged."""
        if self.draining_until is not None:
            return
        while True:
            if not self.staged and not self._compose():
                return
            task, req, ids, window = self.staged[0]
            if self.engine.in_flight >= window:
                return
            self.staged.popleft()
            task.waiting -= 1
            self._submit(task, req, ids)

    def _unstage(self, whose) -> None:
        """Drop the staged lines of the tasks `whose` says (they will not be fed)."""
        for task, *_ in self.staged:
            if whose(task):
                task.waiting -= 1
        self.staged = deque(s for s in self.staged if not whose(s[0]))

    def _compose(self) -> bool:
        """Stage the next lines; False if none can be staged now."""
        hunter = next((t for t in self.tasks.values() if t.hunting), None)
        staged = self._compose_part(hunter) if hunter is not None else None
        if staged is not None:
            return staged
        size = self.engine.capacity if self.group else 1
        batch = []
        while len(batch) < size:
            share = self.fair.choose(t.share for t in self.tasks.values() if t.peek() is not None)
            if share is None:
                break
            task = self.tasks[share.key]
            req = task.take()
            self.fair.fed(share, req.index)
            ids = self.ahead.take(task.key, req.index) if self.ahead is not None else None
            batch.append((task, req, ids))
        if len(batch) > 1 and self.group:
            batch.sort(key=lambda item: window_order((item[0].share.priority, item[0].order.model, item[2])))
        self.staged.extend((task, req, ids, self.engine.capacity) for task, req, ids in batch)
        return bool(batch)

    def _compose_part(self, task: TaskRun) -> bool | None:
        """Stage the next line of the part of a culprit hunt the task runs: True if staged, False if
        it must wait, None once the hunt is over.
        While a task hunts no other line runs, and a part starts only when nothing is in flight, so a
        crash during a part is that part's doing; a part that ended clean is committed first."""
        while task.trial is None or task.peek() is None:
            if self.engine.in_flight:
                return False
            if task.trial is not None:
                self._commit(task)
            part = task.next_part()
            self.channel.send(p.Running(part and part[0], task.key, part and part[1]))
            if part is None:
                return None
        req = task.take()
        self.fair.fed(task.share, req.index)
        ids = self.ahead.take(task.key, req.index) if self.ahead is not None else None
        self.staged.append((task, req, ids, self.engine.capacity))
        return True

    def _submit(self, task: TaskRun, req: Request, ids: list[list[int]] | None) -> None:
        task.log.fed(req.index)
        try:
            # the task's model: the base or one of its adapters
            self.engine.submit(req, ids, tag=task.key, priority=task.share.priority, model=task.order.model)
        except RequestRejected as exc:
            error = {"message": str(exc), "param": exc.param, "code": "invalid_request"}
            self._finished(task, Finished(req.index, req.custom_id, 400, error=error, tag=task.key))
            return
        except Exception as exc:  # the engine's own fault for this request: it fails alone
            log.exception("request %s raised in the engine", req.custom_id)
            message = ENGINE_ERROR.format(f"{type(exc).__name__}: {exc}"[:300])
            error = {"message": message, "param": None, "code": "engine_error", "type": "server_error"}
            self._finished(task, Finished(req.index, req.custom_id, 500, error=error, tag=task.key))
            return
        task.in_flight.add(req.index)
        if task.timeout is not None:  # only timed requests need their start time
            task.started[req.index] = (time.monotonic(), req.custom_id)

    def _finished(self, task: TaskRun, fin: Finished) -> None:
        task.in_flight.discard(fin.index)
        self.fair.finished(task.share, fin.index, fin.completion_tokens)
        task.record(fin)
        self._first_result(task)

    def _first_result(self, task: TaskRun) -> None:
        """The task's first result in this process goes to the committer now; the later ones wait
        for the interval, so the commits' rate does not grow with the results'."""
        if not task.answered:
            task.answered = True
            self._firsts.put(task)
            self._wake.set()

    def _collect(self) -> None:
        for fin in self.engine.step():
            task = self.tasks.get(fin.tag)
            if task is not None:  # else its task was cancelled or gave up its slot
                self._finished(task, fin)
        now = time.monotonic()
        for task in self.tasks.values():
            if task.timeout is not None:
                self._expire(task, now - task.timeout)

    def _expire(self, task: TaskRun, cutoff: float) -> None:
        """Fail alone every request of the task handed to the engine before `cutoff` (oldest first)."""
        while task.started:
            index, (t0, custom_id) = next(iter(task.started.items()))
            if t0 > cutoff:
                return
            self.engine.abort(index, task.key)
            task.in_flight.discard(index)
            self.fair.finished(task.share, index, 0)
            message = f"the request ran longer than request_timeout_seconds ({task.timeout:g} s)"
            task.record_failure(index, custom_id, "request_timeout", message)
            self._first_result(task)
