"""One task on the copies of its model: the daemon leases shards of consecutive lines to the copies,
appends the results they send back to the task's log and moves its marker. The daemon stays the one
writer of state/; outputs are the same files as with one copy. The copies themselves belong to the
slot (`pool.Copies`); a task only borrows them.

Faults: a copy that dies gives its shards back (what it sent is kept, the rest runs again); a shard
that was on a dead copy is a suspect and runs alone on its copy, so a second death is its own: a
suspect of several lines is halved (crashes.halves), and a line that kills a copy alone fails with
`engine_crash`. Another task's line never fails a task.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import orjson

from dropbox_runner import protocol as p
from dropbox_runner.lines.parse import iter_raw_lines, quote
from dropbox_runner.results.log import ResultLog
from dropbox_runner.results.records import error_line, failure_line, request_ids
from dropbox_runner.slot import crashes
from dropbox_runner.slot.copies import plan as shardplan

log = logging.getLogger("dropbox_runner.daemon")

MAX_SHARD_LINES = 1024
DUPLICATES_COMMIT_BYTES = 4 << 20  # the daemon holds at most this much of the duplicates' errors
MAX_COPY_DEATHS = 8  # deaths of copies holding a task's shards, beyond its poison lines, before it fails
PLAN_ENTRIES_PER_PUMP = 4096  # plan entries handled per turn of the daemon's loop, at most
POISON_MESSAGE = "this request crashed a copy of the model process, alone; it was not run again"


@dataclass
class Shard:
    start: int
    end: int
    crashes: int = 0  # deaths of copies that held it; a suspect (> 0) runs alone on a copy


class ShardedTask:
    """A task's side of the copies: its log, its plan, the shards not yet leased."""

    def __init__(self, order: p.TaskOrder, root: str, replicas: int) -> None:
        self.order, self.key, self.total = order, order.task_id, order.total
        self.log = ResultLog(Path(order.log), order.total, blocking_lock=False)
        try:  # a full disk here must not leave the log's lock held (the next start would get EAGAIN)
            recovery = self.log.recover()
            self.log.mark_started()
        except BaseException:
            self.log.close()
            raise
        self.resumed = p.Resumed(recovery.kept, recovery.notes, self.key)
        self.answered = recovery.kept  # lines with a result, committed or not: counted in `append` only
        missing = self.total - recovery.kept
        self.size = max(1, min(MAX_SHARD_LINES, math.ceil(missing / (replicas * 4)) if missing else 1))
        self.cursor = 0  # lines before it were cut into shards already
        self.queue: deque[Shard] = deque()  # shards given back or cut off, leased before new ones
        self.poison = order.poison  # the task record's own list: a line found poison stays with it
        self.deaths = 0
        self.narrowings = 0  # deaths that halved a suspect shard (not counted toward giving up)
        self.leaving: str | None = None  # why it ends (a TaskDone outcome), once no shard is out
        self.withdrawn = False  # the copies holding its shards were told to end them
        self.error: str | None = None
        self.checkpoints: list[list[int]] = []
        self.planned_to = 0  # every line before it is planned: its duplicates failed
        self.plan: shardplan.PlanThread | None = shardplan.PlanThread(order.input, root)
        self._input = open(order.input, "rb")  # noqa: SIM115 (closed when the plan is done)
        self._pending_duplicates = 0  # bytes of duplicates' error lines not yet committed

    # -- the plan, taken a part at a time on the daemon's loop -------------------------------------
    def take_plan(self) -> bool:
        """Handle what the plan's thread has read; True while it is not done."""
        if self.plan is None:
            return False
        for kind, index, *where in self.plan.take(PLAN_ENTRIES_PER_PUMP):
            if kind == "end":
                self._plan_ended(index)
                return False
            if kind == "c":
                self.checkpoints.append([index, *where])
                self.planned_to = index
            elif not self.log.done[index]:
                self._fail_duplicate(index, *where)
        return True

    def _plan_ended(self, code: int | str) -> None:
        self.plan = None
        self._input.close()
        self.planned_to = self.total
        if code:
            self.give_up(f"the shard plan of {self.key} failed ({code}); see the daemon's log")

    def _fail_duplicate(self, index: int, offset: int, line: int) -> None:
        """Fail line `index` (at `offset`) for repeating an earlier custom_id, as one copy would."""
        self._input.seek(offset)
        custom_id = shardplan.custom_id(next(iter_raw_lines(self._input, offset, index, line - 1)).data)
        ids = request_ids(self.order.job_id, self.order.model, index)
        message = f"line {line}: duplicate custom_id {quote(custom_id)}"
        payload = error_line(custom_id, 400, message, ids, param="custom_id", code="invalid_request")
        self.append(index, False, 0, 0, payload)
        self._pending_duplicates += len(payload)
        if self._pending_duplicates >= DUPLICATES_COMMIT_BYTES:
            self.log.commit()  # bounded whatever the count; the next Progress carries the marker
            self._pending_duplicates = 0

    def _start_of(self, index: int) -> list[int]:
        """Where a copy starts reading for a shard that begins at line `index`: the checkpoint before."""
        checkpoint = self.checkpoints[min(index // shardplan.CHECKPOINT, len(self.checkpoints) - 1)]
        return [checkpoint[1], checkpoint[2], checkpoint[0]]

    # -- shards ------------------------------------------------------------------------------------
    def next_shard(self, window: int | None, alone: bool) -> Shard | None:
        """The next shard to lease, at most `window` lines: to a copy that holds nothing else
        (`alone`) a suspect first; a suspect never to another. None while nothing can be leased."""
        if self.leaving:
            return None
        self.queue = deque(s for s in self.queue if self._skip_done(s))
        shard = next((s for s in self.queue if s.crashes), None) if alone else None
        shard = shard or next((s for s in self.queue if not s.crashes), None)
        if shard is not None:
            self.queue.remove(shard)
        else:
            shard = self._fresh()
        if shard is not None and window and shard.end - shard.start > window:
            self.queue.appendleft(Shard(shard.start + window, shard.end, shard.crashes))
            shard.end = shard.start + window
        return shard

    @property
    def suspect_waiting(self) -> bool:
        return any(s.crashes for s in self.queue)

    def _skip_done(self, shard: Shard) -> bool:
        while shard.start < shard.end and self.log.done[shard.start]:
            shard.start += 1
        return shard.start < shard.end

    def _fresh(self) -> Shard | None:
        """The next run of lines without a result after the cursor, once its lines are planned."""
        done = self.log.done
        start = done.find(0, self.cursor)
        if start < 0:
            self.cursor = self.total
            return None
        end = min(start + self.size, self.total)
        hole = done.find(1, start, end)
        end = hole if hole >= 0 else end
        if end > self.planned_to:
            return None  # its duplicates are not known yet
        self.cursor = end
        return Shard(start, end)

    def shard_order(self, shard: Shard, shard_id: str) -> p.TaskOrder:
        o = self.order
        return p.TaskOrder(
            job_id=o.job_id,
            model=o.model,
            input=o.input,
            log=o.log,
            total=o.total,
            defaults=o.defaults,
            commit_interval_ms=o.commit_interval_ms,
            request_timeout_seconds=o.request_timeout_seconds,
            shard=[shard.start, shard.end],
            shard_at=self._start_of(shard.start),
            shard_done=self._done_in(shard),
            task_id=shard_id,
            priority=o.priority,
            group=o.group,
        )

    def shard_bytes(self, order: p.TaskOrder) -> bytes:
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

    def ended(self, shard: Shard) -> None:
        """A copy is done with a shard (it said so): what it left without a result is leased again."""
        if not self.leaving and self._skip_done(shard):
            self.queue.appendleft(shard)

    def copy_died(self, shards: list[Shard]) -> None:
        """A copy that held these shards of the task died (one death): their lines without a result
        run again, the culprit is hunted among them; too many deaths and the task gives up."""
        self.deaths += 1
        for shard in shards:
            self.give_back(shard)
        if self.deaths > MAX_COPY_DEATHS + len(self.poison) + self.narrowings:
            self.give_up(f"copies of {self.order.model} died {self.deaths} times with shards of {self.key}")

    def give_back(self, shard: Shard) -> None:
        """A dead copy's shard: its missing lines run again; the culprit is hunted by halving."""
        if not self._skip_done(shard):  # what the copy sent is kept: the shard resumes after it
            return
        shard.crashes += 1
        missing = [i for i in range(shard.start, shard.end) if not self.log.done[i]]
        verdict = crashes.after_shard_crash(shard.crashes, len(missing) == 1)
        if verdict == "poison":
            self._poison(missing[0])
        elif verdict == "split":
            log.warning("lines %d-%d killed two copies; halving them", shard.start, shard.end - 1)
            self.narrowings += 1  # a death that narrows the hunt is not given up for
            self.queue.extendleft(reversed([Shard(a, b + 1, crashes=1) for a, b in crashes.halves(missing)]))
        else:
            self.queue.appendleft(shard)

    def _done_in(self, shard: Shard) -> list[int]:
        """Lines of a given-back shard that have a result (a copy answers out of order): the copy
        that takes the shard skips them, so a committed result is never computed again."""
        done = self.log.done
        return [i for i in range(shard.start, shard.end) if done[i]]

    def _poison(self, index: int) -> None:
        self.poison.append(index)
        log.error("line %d of %s crashed a copy alone; it fails with engine_crash", index, self.key)
        ids = request_ids(self.order.job_id, self.order.model, index)
        custom_id = _custom_id_at(self.order.input, index)
        self.append(index, False, 0, 0, failure_line(custom_id, "engine_crash", POISON_MESSAGE, ids))

    def give_up(self, why: str) -> None:
        if not self.leaving:
            self.leaving, self.error = "crashed", why

    # -- results: the one path ---------------------------------------------------------------------
    def results(self, records: list[list]) -> None:
        """A copy's results (Results.records); a line that already has one keeps it."""
        for index, ok, pt, ct, cached, payload in records:
            if not self.log.done[index]:
                self.append(index, ok, pt, ct, payload.encode(), cached)

    def append(self, index: int, ok: bool, pt: int, ct: int, payload: bytes, cached: int = 0) -> None:
        self.log.append(index, ok, pt, ct, payload, cached)
        self.answered += 1

    def commit(self) -> p.Progress | None:
        """Make what arrived durable; the marker as a Progress event if anything new was committed."""
        if not self.log.commit():
            return None
        self._pending_duplicates = 0
        m = self.log.marker
        return p.Progress(m.count, m.failed, m.completion_tokens, m.started_at, m.updated_at, self.key)

    @property
    def complete(self) -> bool:
        return self.answered >= self.total

    def close(self) -> None:
        """Commit what arrived, stop the plan, release the log's lock."""
        if self.plan is not None:
            self.plan.stop()
            self._input.close()
            self.plan = None
        try:
            self.log.commit()
        finally:
            self.log.close()


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
