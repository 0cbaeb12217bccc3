"""A task spread over several copies of its model (`replicas: N`): the daemon leases shards of
consecutive lines to the copies, appends the results they send back to the task's log and moves
its marker. The daemon stays the one writer of state/; outputs are the same files as with one copy.

Faults: a copy that dies gives its shard back (what it sent is kept, the rest runs again on another
copy); a shard that kills two copies runs line by line, and a line that kills a copy alone fails
with `engine_crash`.
"""

from __future__ import annotations

import logging
import math
import os
import select
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO

import orjson

from dropbox_runner import protocol as p
from dropbox_runner.config import ModelConfig, Settings
from dropbox_runner.layout import Layout
from dropbox_runner.lines.parse import iter_raw_lines, quote
from dropbox_runner.queue.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.results.log import ResultLog
from dropbox_runner.results.records import error_line, failure_line, request_ids
from dropbox_runner.slot import crashes
from dropbox_runner.slot.copies import plan as shardplan
from dropbox_runner.slot.supervisor import ModelProcess
from dropbox_runner.status.history import History

log = logging.getLogger("dropbox_runner.daemon")

MAX_SHARD_LINES = 1024
DUPLICATES_COMMIT_BYTES = 4 << 20  # the daemon holds at most this much of the duplicates' errors
MAX_COPY_DEATHS = 8  # deaths of copies on one task, beyond its poison lines, before it fails
POISON_MESSAGE = "this request crashed a copy of the model process, alone; it was not run again"


@dataclass
class Shard:
    start: int
    end: int
    crashes: int = 0

    @property
    def alone(self) -> bool:
        return self.end - self.start == 1


@dataclass
class Copy:
    index: int
    proc: ModelProcess
    shard: Shard | None = None


class ShardedRun:
    def __init__(
        self,
        layout: Layout,
        journal: Journal,
        settings: Settings,
        history: History,
        spec: JobSpec,
        task: TaskRecord,
        config: ModelConfig,
        order: p.TaskOrder,
    ) -> None:
        self.layout, self.settings, self.history = layout, settings, history
        self.spec, self.task, self.config, self.order = spec, task, config, order
        self.ray = None
        if config.executor == "ray":
            if settings.ray_address == "local":  # a private instance: loopback only (read at import)
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            from dropbox_runner.slot.copies import (
                ray as raycopies,  # Ray is imported only when a model asks for it
            )

            raycopies.ensure_ray(settings.ray_address, layout.state)
            self.ray = raycopies
        self.log = ResultLog(journal.log_path(spec.id, task.model), spec.total, blocking_lock=False)
        try:  # a full disk here must not leave the log's lock held (the next start would get EAGAIN)
            recovery = self.log.recover()
            for note in recovery.notes:
                log.warning("recovery of %s/%s: %s", spec.id, task.model, note)
            self.log.mark_started()
            self.answered = recovery.kept  # lines with a result, committed or not
            self.checkpoints = self._plan()
        except BaseException:
            self.log.close()
            raise
        self.queue: deque[Shard] = deque(self._shards(config.replicas))
        self.deaths = 0
        self.failed: str | None = None  # why the task cannot go on
        self.last_commit = time.monotonic()
        self.copies = [self._start_copy(i) for i in range(config.replicas)]
        what = (spec.id, task.model, config.replicas, len(self.queue), recovery.kept)
        log.info("%s/%s on %d copies: %d shards, %d results already committed", *what)

    # -- shards and copies -------------------------------------------------------------------------
    def _shards(self, copies: int) -> list[Shard]:
        """The lines still without a result, as runs of consecutive lines cut to a fair size."""
        done = self.log.done
        missing = self.spec.total - sum(done)
        size = max(1, min(MAX_SHARD_LINES, math.ceil(missing / (copies * 4)) if missing else 1))
        shards, start = [], None
        for i in range(self.spec.total + 1):
            free = i < self.spec.total and not done[i]
            if free and start is None:
                start = i
            if start is not None and (not free or i - start >= size):
                shards.append(Shard(start, i))
                start = i if free else None
        return shards

    def _plan(self) -> list[list[int]]:
        """Checkpoints ([index, offset, line] every shardplan.CHECKPOINT lines), read as the child
        prints them; a line that repeats an id fails in place as it comes, as with one copy."""
        checkpoints, cmd = [], [sys.executable, "-m", "dropbox_runner.slot.copies.plan", self.order.input]
        pending = 0  # bytes of duplicates' error lines not yet committed: bounded, however many
        with (
            subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=self.layout.root) as child,
            open(self.order.input, "rb") as f,
        ):
            for entry in child.stdout:
                kind, index, offset, line = orjson.loads(entry)
                if kind == "c":
                    checkpoints.append([index, offset, line])
                elif not self.log.done[index]:
                    pending += self._fail_duplicate(f, index, offset, line)
                    if pending >= DUPLICATES_COMMIT_BYTES:
                        self.commit()
                        pending = 0
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, cmd)
        return checkpoints

    def _fail_duplicate(self, f: BinaryIO, index: int, offset: int, line: int) -> int:
        """Fail line `index` (at `offset`) for repeating an earlier custom_id; the bytes appended."""
        f.seek(offset)
        custom_id = shardplan.custom_id(next(iter_raw_lines(f, offset, index, line - 1)).data)
        ids = request_ids(self.spec.id, self.task.model, index)
        message = f"line {line}: duplicate custom_id {quote(custom_id)}"
        payload = error_line(custom_id, 400, message, ids, param="custom_id", code="invalid_request")
        self.log.append(index, False, 0, 0, payload)
        self.answered += 1
        return len(payload)

    def _start_of(self, index: int) -> list[int]:
        """Where a copy starts reading for a shard that begins at line `index`: the checkpoint before."""
        checkpoint = self.checkpoints[min(index // shardplan.CHECKPOINT, len(self.checkpoints) - 1)]
        return [checkpoint[1], checkpoint[2], checkpoint[0]]

    def _start_copy(self, index: int) -> Copy:
        if self.ray is not None:
            return Copy(index, self.ray.RayCopy(self.layout, self.task.model, self.config))
        devices = self.config.devices
        env = {"CUDA_VISIBLE_DEVICES": devices[index] if devices else str(index)}
        return Copy(index, ModelProcess(self.layout, self.task.model, self.config, env=env))

    def _lease(self, copy: Copy) -> None:
        while self.queue:
            shard = self.queue.popleft()
            if shard.start < shard.end:
                copy.shard = shard
                order = p.TaskOrder(
                    job_id=self.order.job_id,
                    model=self.order.model,
                    input=self.order.input,
                    log=self.order.log,
                    total=self.order.total,
                    defaults=self.order.defaults,
                    commit_interval_ms=self.order.commit_interval_ms,
                    request_timeout_seconds=self.order.request_timeout_seconds,
                    shard=[shard.start, shard.end],
                    shard_at=self._start_of(shard.start),
                )
                if self.ray is not None:  # a copy on another host may not see the root: it gets the lines
                    copy.proc.send_with_lines(p.Run(order), self._shard_bytes(order))
                else:
                    copy.proc.send(p.Run(order))
                copy.proc.last_event_at = time.monotonic()
                return

    def _shard_bytes(self, order: p.TaskOrder) -> bytes:
        """The input's bytes from the shard's checkpoint to the end of its last line."""
        offset, line, index = order.shard_at
        end = offset
        with open(self.order.input, "rb") as f:
            f.seek(offset)
            for raw in iter_raw_lines(f, offset, index, line - 1):
                if raw.index >= order.shard[1]:
                    break
                end = f.tell()
            f.seek(offset)
            return f.read(end - offset)

    # -- the loop ----------------------------------------------------------------------------------
    def pump(self, timeout: float) -> bool:
        """Read the copies' events for up to `timeout` s; True once every line has a result."""
        if self.ray is not None:
            self.ray.wait_any([c.proc for c in self.copies], timeout)
            ready = list(self.copies)
        else:
            pipes = {c.proc.fileno(): c for c in self.copies}
            try:
                fds, _, _ = select.select(list(pipes), [], [], timeout)
            except (ValueError, OSError):
                fds = []
            ready = [pipes[fd] for fd in fds]
        for copy in ready:
            for ev in copy.proc.events(0):
                self._event(copy, ev)
        for copy in list(self.copies):
            why = copy.proc.trouble(self.settings, busy=copy.shard is not None)
            if why is not None:
                for ev in copy.proc.drain() if not copy.proc.alive() else ():
                    self._event(copy, ev)
                self._died(copy, why)
        if time.monotonic() - self.last_commit >= self.settings.commit_interval_ms / 1000:
            self.commit()
        return self.finished()

    def _event(self, copy: Copy, ev: p.Message) -> None:
        if isinstance(ev, p.Loaded):
            log.info("loaded copy %d of %s in %.1fs", copy.index, self.task.model, ev.load_seconds)
            self.history.loaded(self.task.model, time.time() - ev.load_seconds, ev.load_seconds)
            if self.task.load_seconds is None:
                self.task.load_seconds = ev.load_seconds
            self._lease(copy)
        elif isinstance(ev, p.LoadFailed):
            self.failed = f"the model {self.task.model} could not load: {ev.reason}"
        elif isinstance(ev, p.Results):
            for index, ok, pt, ct, cached, payload in ev.records:
                if not self.log.done[index]:
                    self.log.append(index, ok, pt, ct, payload.encode(), cached)
                    self.answered += 1
        elif isinstance(ev, p.TaskDone):
            copy.shard = None
            self._lease(copy)

    def _died(self, copy: Copy, why: str) -> None:
        copy.proc.end(1.0)
        shard, copy.shard = copy.shard, None
        self.deaths += 1
        log.error(
            "copy %d of %s %s (shard %s)",
            copy.index,
            self.task.model,
            why,
            shard and (shard.start, shard.end),
        )
        if not copy.proc.loaded and shard is None and self.failed is None and self.deaths > MAX_COPY_DEATHS:
            self.failed = f"copies of {self.task.model} keep dying while loading ({why})"
        if shard is not None:
            self._give_back(shard)
        if self.deaths > MAX_COPY_DEATHS + len(self.task.poison):
            self.failed = self.failed or f"copies of {self.task.model} died {self.deaths} times ({why})"
        if self.failed is None:
            self.copies[self.copies.index(copy)] = self._start_copy(copy.index)
        else:
            self.copies.remove(copy)

    def _give_back(self, shard: Shard) -> None:
        """A dead copy's shard: its missing lines run again; the culprit is hunted line by line."""
        done = self.log.done
        while shard.start < shard.end and done[shard.start]:
            shard.start += 1  # what the copy sent is kept: the shard resumes after it
        if all(done[shard.start : shard.end]):
            return
        shard.crashes += 1
        verdict = crashes.after_shard_crash(shard.crashes, shard.alone)
        if verdict == "poison":
            self._poison(shard.start)
        elif verdict == "split":
            log.warning(
                "lines %d-%d killed two copies; running them one at a time", shard.start, shard.end - 1
            )
            self.queue.extendleft(
                reversed([Shard(i, i + 1, crashes=1) for i in range(shard.start, shard.end)])
            )
        else:
            self.queue.appendleft(shard)

    def _poison(self, index: int) -> None:
        self.task.poison.append(index)
        log.error("line %d of %s crashed a copy alone; it fails with engine_crash", index, self.spec.id)
        ids = request_ids(self.spec.id, self.task.model, index)
        custom_id = _custom_id_at(self.order.input, index)
        self.log.append(index, False, 0, 0, failure_line(custom_id, "engine_crash", POISON_MESSAGE, ids))
        self.answered += 1

    def commit(self) -> None:
        self.last_commit = time.monotonic()
        before = self.log.marker.count, self.log.marker.completion_tokens
        if self.log.commit():
            m = self.log.marker
            self.history.done(self.task.model, m.count - before[0], m.completion_tokens - before[1])

    def finished(self) -> bool:
        return self.answered >= self.spec.total

    def close(self) -> None:
        """Commit what arrived and end every copy (on a full disk too: then close the log, as above)."""
        try:
            self.commit()
        finally:
            for copy in self.copies:
                copy.proc.end(self.settings.stop_timeout_seconds)
            self.copies = []
            self.log.close()

    def describe(self) -> dict:
        first = self.copies[0].proc if self.copies else None
        return {
            "executor": self.config.executor,
            "copies": [
                {
                    "pid": c.proc.pid,
                    "loaded": c.proc.loaded,
                    "shard": c.shard and [c.shard.start, c.shard.end],
                }
                for c in self.copies
            ],
            "model_pid": first.pid if first else None,
        }


def _custom_id_at(input_path: str, index: int) -> str | None:
    """The custom_id of the non-blank line `index` of a file (read when a line is found poison)."""
    with open(input_path, "rb") as f:
        for raw in iter_raw_lines(f):
            if raw.index == index:
                try:
                    obj = orjson.loads(raw.data or b"")
                except orjson.JSONDecodeError:
                    return None
                cid = obj.get("custom_id") if isinstance(obj, dict) else None
                return cid if isinstance(cid, str) else None
    return None
