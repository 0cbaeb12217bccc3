"""The daemon's sharing turn (CONTRACT section 12): while a model process runs, admit a queued task
of its model, take a slot back, or preempt it for another model; the decision is
`queue.scheduler.admission`'s (pure), this gathers what it needs and carries it out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dropbox_runner.config import Registry
from dropbox_runner.queue import scheduler
from dropbox_runner.queue.journal import Journal
from dropbox_runner.slot.execution import Execution
from dropbox_runner.slot.task import group_of

log = logging.getLogger("dropbox_runner.daemon")


class Sharing:
    def __init__(self, journal: Journal, registry: Registry) -> None:
        self.journal, self.registry, self.settings = journal, registry, registry.settings
        self.groups: dict[str, str] = {}  # job id -> fair-share group (a spec never changes)

    def turn(self, ex: Execution, model_problems: dict[str, str], guarded: Callable) -> None:
        """`guarded(job_id, operation, *args)` runs an operation inside the job's boundary."""
        if not ex.running or ex.preempting or ex.proc is None:
            return
        held_keys = ex.running_keys()
        queued = [e for e in self.journal.queued() if e[0] not in held_keys]
        if not queued:
            return
        solo = bool(ex.solo & set(ex.running))  # a task suspected by a crash runs alone
        queued = [
            e
            for e in queued
            if self.registry.base_of(e[2]) != ex.proc.name or f"{e[1]}/{e[2]}" not in ex.solo
        ]
        held = [
            scheduler.Held(r.task.queue_key, r.key, r.group, bool(r.leaving)) for r in ex.running.values()
        ]
        decision = scheduler.admission(
            queued,
            held,
            ex.proc.name,
            {e[0]: self.group(e[1]) for e in queued},
            max_shared=1 if solo else self.settings.max_shared_tasks,
            max_delay=self.settings.max_swap_delay_seconds,
            preempt_after=self.settings.preempt_after_seconds,
            loaded_for=time.monotonic() - ex.proc.started_at,
            runnable=set(self.registry.models) - set(model_problems),
            back_since=ex.back_since,
            # an adapter the process was started with joins it; one made since needs a new process
            base_of=lambda m: self.registry.base_of(m) if m in ex.answers_for else m,
        )
        if decision.preempt:
            ex.preempt(decision.preempt, decision.admit)
        elif decision.evict:
            ex.evict(decision.evict, decision.reason)
        elif decision.admit is not None:
            choice = decision.admit
            if self.journal.dequeue_if_stale(choice.key, choice.job_id, choice.model):
                return
            guarded(choice.job_id, ex.start, choice)
        elif decision.reason:
            log.debug("no admission: %s", decision.reason)

    def group(self, job_id: str) -> str:
        if job_id not in self.groups:
            try:
                spec = self.journal.spec(job_id)
            except (OSError, ValueError):
                return ""
            self.groups[job_id] = group_of(self.journal, spec, self.settings.fair_share_key)
        return self.groups[job_id]
