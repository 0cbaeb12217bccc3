"""The copies of a model (`replicas: N`, `executor: ray`) as the slot holds them: started once for the
model, they serve every task of it the slot admits, and end when the model is switched or the daemon
stops. A new task does not reload them.

To the slot, `Copies` is a model process like `supervisor.ModelProcess` (`slot.handle.ModelHandle`): it takes `Run`, `Cancel` and
`Stop` commands and gives the same events (Loaded, Resumed, Progress, TaskDone), so the slot's code
does not branch on copies. Inside, each task is a `shards.ShardedTask`; each copy holds up to
LEASE_AHEAD shards of each task at once (a shard is at most one window while tasks share), and its
own feeding loop shares its engine between them as one process shares it between tasks.
"""

from __future__ import annotations

import logging
import os
import select
import time
from dataclasses import dataclass, field
from typing import Any

from dropbox_runner import protocol as p
from dropbox_runner.config import ModelConfig, Settings
from dropbox_runner.layout import Layout
from dropbox_runner.slot.copies.shards import MAX_COPY_DEATHS, Shard, ShardedTask
from dropbox_runner.slot.supervisor import ModelProcess, group_rss_bytes

log = logging.getLogger("dropbox_runner.daemon")

LEASE_AHEAD = 2  # shards of one task a copy holds at once: the next is there when one ends


@dataclass
class Copy:
    index: int
    proc: Any  # ModelProcess, or ray.RayCopy
    capacity: int = 0  # its window, once loaded
    held: dict[str, tuple[ShardedTask, Shard]] = field(default_factory=dict)  # by shard id

    def count(self, task: ShardedTask) -> int:
        return sum(1 for t, _ in self.held.values() if t is task)

    @property
    def isolating(self) -> bool:
        """It runs a suspect shard, alone."""
        return any(s.crashes for _, s in self.held.values())


class Copies:
    """Several copies of one model, with the interface of `ModelProcess` that the slot uses."""

    def __init__(self, layout: Layout, name: str, config: ModelConfig, settings: Settings) -> None:
        self.layout, self.name, self.config, self.settings = layout, name, config, settings
        self.ray = None
        if config.executor == "ray":
            if settings.ray_address == "local":  # a private instance: loopback only (read at import)
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            from dropbox_runner.slot.copies import (
                ray as raycopies,  # Ray is imported only when a model asks for it
            )

            raycopies.ensure_ray(settings.ray_address, layout.state)  # ConnectionError: Ray cannot be reached
            self.ray = raycopies
        self.started_at = time.monotonic()
        self.trials: dict[str, list[int]] = {}  # the copies hunt their culprits themselves (shards.py)
        self.tasks: dict[str, ShardedTask] = {}
        self.out: list[p.Message] = []  # events for the slot, given by `events`
        self.load_deaths = 0  # copies that died while loading, since one last loaded
        self.stopping = False  # dead copies are not started again
        self.ended = False
        self.copies = [self._start_copy(i) for i in range(config.replicas)]

    # -- what the slot reads -----------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return any(c.proc.loaded for c in self.copies)

    @property
    def pid(self) -> int:
        return self.copies[0].proc.pid if self.copies else 0

    @property
    def load_seconds(self) -> float | None:
        return next((c.proc.load_seconds for c in self.copies if c.proc.loaded), None)

    def alive(self) -> bool:
        return not self.ended

    def trouble(self, settings: Settings, busy: bool) -> str | None:
        return None  # a copy's death is handled here; what the slot must know arrives as events

    def drain(self) -> list[p.Message]:
        return []  # alive until ended: the slot never drains it

    # -- commands ----------------------------------------------------------------------------------
    def send(self, command: p.Message) -> bool:
        if isinstance(command, p.Run):
            task = ShardedTask(command.task, str(self.layout.root), self.config.replicas)
            self.tasks[task.key] = task
            self.out.append(task.resumed)
            log.info(
                "%s on %d copies: %d results already committed", task.key, len(self.copies), task.answered
            )
        elif isinstance(command, p.Cancel | p.Stop) and command.task_id in self.tasks:
            task = self.tasks[command.task_id]  # its shards are withdrawn by `_maybe_end`
            task.leaving = task.leaving or ("cancelled" if isinstance(command, p.Cancel) else "interrupted")
        elif isinstance(command, p.Stop) and not command.task_id:  # every task commits and goes
            self.stopping = True
            for task in self.tasks.values():
                task.leaving = task.leaving or "interrupted"
            for copy in self.copies:
                copy.proc.send(p.Stop(grace_seconds=command.grace_seconds))
        return True

    def _withdraw(self, task: ShardedTask) -> None:
        """Tell every copy holding a shard of the task to end it (it sends what it has, then TaskDone)."""
        task.withdrawn = True
        for copy in self.copies:
            for shard_id, (t, _) in copy.held.items():
                if t is task:
                    copy.proc.send(p.Stop(shard_id))

    # -- the loop ----------------------------------------------------------------------------------
    def events(self, timeout: float) -> list[p.Message]:
        """Wait up to `timeout` s for the copies, handle what they said, lease shards; the events for
        the slot (a task's results are committed in the same turn as they arrive)."""
        touched = {t.key for t in list(self.tasks.values()) if t.take_plan()}  # duplicates failed
        for copy in self._ready(0.02 if touched else timeout):
            for ev in copy.proc.events(0):
                self._event(copy, ev, touched)
        for copy in list(self.copies):
            why = copy.proc.trouble(self.settings, busy=bool(copy.held))
            if why is not None:
                for ev in copy.proc.drain() if not copy.proc.alive() else ():
                    self._event(copy, ev, touched)
                self._died(copy, why)
        self._lease()
        for key in touched | set(self.tasks):
            task = self.tasks[key]
            progress = task.commit() if key in touched or task.complete or task.leaving else None
            if progress is not None:
                self.out.append(progress)
            self._maybe_end(task)
        out, self.out = self.out, []
        return out

    def _ready(self, timeout: float) -> list[Copy]:
        if self.ray is not None:
            self.ray.wait_any([c.proc for c in self.copies], timeout)
            return list(self.copies)
        pipes = {c.proc.fileno(): c for c in self.copies if c.proc.alive()}
        try:
            fds, _, _ = select.select(list(pipes), [], [], timeout)
        except (ValueError, OSError):
            fds = []
        return [pipes[fd] for fd in fds]

    def _event(self, copy: Copy, ev: p.Message, touched: set[str]) -> None:
        if isinstance(ev, p.Loaded):
            log.info("loaded copy %d of %s in %.1fs", copy.index, self.name, ev.load_seconds)
            copy.capacity, self.load_deaths = ev.capacity, 0
            self.out.append(ev)
        elif isinstance(ev, p.LoadFailed):  # the engine cannot load here: the slot decides
            self.out.append(ev)
        elif isinstance(ev, p.Results) and ev.task_id in copy.held:
            task = copy.held[ev.task_id][0]
            task.results(ev.records)
            touched.add(task.key)
        elif isinstance(ev, p.TaskDone) and ev.task_id in copy.held:
            task, shard = copy.held.pop(ev.task_id)
            if ev.outcome == "failed":  # the engine refused the task's model (an adapter)
                task.leaving, task.error = task.leaving or "failed", ev.error
            task.ended(shard)

    def _died(self, copy: Copy, why: str) -> None:
        copy.proc.end(1.0)
        held, copy.held = copy.held, {}
        shards = ", ".join(f"{t.key} {s.start}-{s.end}" for t, s in held.values()) or "none"
        say = log.info if self.stopping else log.error  # while stopping, copies end as told
        say("copy %d of %s %s (shards: %s)", copy.index, self.name, why, shards)
        if not self.stopping:  # while stopping, copies end as told: no death counts, no line is a suspect
            by_task: dict[str, tuple[ShardedTask, list[Shard]]] = {}
            for task, shard in held.values():
                by_task.setdefault(task.key, (task, []))[1].append(shard)
            for task, shards in by_task.values():
                task.copy_died(shards)  # one death per task, however many of its shards the copy held
        if not copy.proc.loaded and not self.stopping:
            self.load_deaths += 1
        if self.stopping:
            self.copies.remove(copy)
        elif self.load_deaths > MAX_COPY_DEATHS:
            self.copies.remove(copy)
            self.out.append(p.LoadFailed(f"copies of {self.name} keep dying while loading ({why})"))
            self.stopping = True
        else:
            self.copies[self.copies.index(copy)] = self._start_copy(copy.index)

    def _start_copy(self, index: int) -> Copy:
        if self.ray is not None:
            return Copy(index, self.ray.RayCopy(self.layout, self.name, self.config))
        devices = self.config.devices
        env = {"CUDA_VISIBLE_DEVICES": devices[index] if devices else str(index)}
        return Copy(index, ModelProcess(self.layout, self.name, self.config, env=env))

    def _lease(self) -> None:
        """Give each loaded copy shards of every task (higher priority first), LEASE_AHEAD each. While
        a suspect waits, one copy takes nothing new until it is empty, then runs the suspect alone."""
        if self.stopping:
            return
        tasks = sorted((t for t in self.tasks.values() if not t.leaving), key=lambda t: -t.order.priority)
        window = (
            min((c.capacity for c in self.copies if c.capacity), default=None) if len(tasks) > 1 else None
        )
        loaded = [c for c in self.copies if c.proc.loaded and c.proc.alive()]
        suspect = next((t for t in tasks if t.suspect_waiting), None)
        drain = next((c for c in loaded if not c.isolating), None) if suspect else None
        for copy in loaded:
            if copy is drain:
                shard = None if copy.held else suspect.next_shard(window, alone=True)
                if shard is not None:
                    self._send(copy, suspect, shard)
                continue
            for task in tasks:
                while not copy.isolating and copy.count(task) < LEASE_AHEAD:
                    shard = task.next_shard(window, alone=False)
                    if shard is None:
                        break
                    self._send(copy, task, shard)

    def _send(self, copy: Copy, task: ShardedTask, shard: Shard) -> None:
        shard_id = f"{task.key}@{shard.start}"
        order = task.shard_order(shard, shard_id)
        if not copy.held:
            copy.proc.last_event_at = time.monotonic()  # the stall clock starts with its work
        copy.held[shard_id] = (task, shard)
        if self.ray is not None:  # a copy on another host may not see the root: it gets the lines
            copy.proc.send_with_lines(p.Run(order), task.shard_bytes(order))
        else:
            copy.proc.send(p.Run(order))

    def _maybe_end(self, task: ShardedTask) -> None:
        """A task ends once every line has a result, or once it leaves and no copy holds its shards."""
        if task.complete and task.leaving in (None, "interrupted"):
            task.leaving = "completed"
            self._withdraw(task)  # shards still out hold nothing it needs
            for copy in self.copies:
                copy.held = {k: v for k, v in copy.held.items() if v[0] is not task}
        if task.leaving and not task.withdrawn and not self.stopping:
            self._withdraw(task)  # cancelled, evicted or given up: what the copies sent is kept
        if not task.leaving or any(copy.count(task) for copy in self.copies):
            return
        del self.tasks[task.key]
        task.close()
        self.out.append(p.TaskDone(task.leaving, task.key, task.error))

    # -- ending ------------------------------------------------------------------------------------
    def end(self, timeout: float) -> float:
        """End every copy; what arrived is committed and every task's log released."""
        t0 = time.monotonic()
        self.stopping = self.ended = True
        for copy in self.copies:
            copy.proc.end(timeout)
        for task in self.tasks.values():
            try:
                task.close()
            except OSError as exc:  # the disk failed: what was not committed runs again
                log.error("cannot commit %s: %s", task.key, exc)
        self.tasks.clear()
        return time.monotonic() - t0

    def describe(self) -> dict[str, Any]:
        local = self.ray is None
        return {
            "executor": self.config.executor,
            "copies": [
                {
                    "pid": c.proc.pid,
                    "loaded": c.proc.loaded,
                    "shard": next(([s.start, s.end] for _, s in c.held.values()), None),
                    "shards": [[t.key, s.start, s.end] for t, s in c.held.values()],  # of every task
                }
                for c in self.copies
            ],
            "model_pid": self.pid or None,
            "model_rss_mb": round(sum(group_rss_bytes(c.proc.pid) for c in self.copies) / 2**20, 1)
            if local
            else None,
        }
