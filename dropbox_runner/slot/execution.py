"""The model slot: at most one loaded model, the tasks it runs together, and what its events mean.

Starts and swaps the model's handle (one process, or its copies: `loading`), hands it tasks
(several at once: section 12), takes a task's slot back for a higher priority or another group,
preempts for another model, turns events into job operations, and applies the crash policy when
the process dies or hangs. The daemon drives it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from dropbox_runner import protocol as p
from dropbox_runner.config import Registry
from dropbox_runner.jobs.operations import Jobs
from dropbox_runner.queue.journal import JobSpec
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.queue.scheduler import Choice
from dropbox_runner.results.log import read_marker
from dropbox_runner.slot.failures import SlotFailures
from dropbox_runner.slot.handle import ModelHandle
from dropbox_runner.slot.loadable import adapter_problem
from dropbox_runner.slot.loading import CannotLoad, open_model
from dropbox_runner.slot.task import SlotTask, group_of
from dropbox_runner.status.history import History

log = logging.getLogger("dropbox_runner.daemon")


class Execution(SlotFailures):
    def __init__(self, jobs: Jobs, registry: Registry, history: History) -> None:
        self.jobs, self.journal, self.layout, self.history = jobs, jobs.journal, jobs.layout, history
        self.registry, self.settings = registry, registry.settings
        self.proc: ModelHandle | None = None  # the loaded model: one process or its copies
        self.running: dict[str, SlotTask] = {}  # by task id: the tasks the model process holds
        self.answers_for: set[str] = set()  # the running process's model and the adapters it was started with
        self.memory_retry: dict[str, float] = {}
        self.load_deaths: dict[str, int] = {}  # model processes killed while loading, per model
        self.swaps: deque[dict[str, Any]] = deque(maxlen=20)
        self.pause_reason: str | None = None  # set when the disk failed: the daemon pauses
        self.preempting: str | None = None  # why the process is stopping for another model
        self.next_choice: Choice | None = None  # the task that preempted: it starts next
        self.event_job: str | None = None  # whose event pump handles now: an error there is that job's
        self.back_since: dict[str, float] = {}  # queue key -> when it gave up its slot
        self.solo: set[str] = set()  # tasks with a culprit hunt (failures.py): they run alone
        self.shared_crash: dict[str, int] = {}  # tasks in flight at the last crash while sharing
        self._io_error: str | None = None

    @property
    def loaded_model(self) -> str | None:
        return self.proc.name if self.proc is not None and self.proc.alive() else None

    @property
    def task(self):
        """The first running task's record, or None (one task at a time: the running task)."""
        return next(iter(self.running.values())).task if self.running else None

    @property
    def busy(self) -> bool:
        return bool(self.running) or self.preempting is not None

    def running_keys(self) -> set[str]:
        return {t.task.queue_key for t in self.running.values()}

    # -- starting a task ---------------------------------------------------------------------------
    def start(self, choice: Choice) -> None:
        spec = self.journal.spec(choice.job_id)
        task = self.journal.task(choice.job_id, choice.model)
        if task.status.final:
            self.journal.dequeue(task)
            return
        if spec.expires_at is not None and time.time() >= spec.expires_at:
            self.jobs.cancelled(spec, None, Status.EXPIRED)  # a queued job that expired never loads
            return
        run = SlotTask(task, spec, group_of(self.journal, spec, self.settings.fair_share_key))
        task.group = run.group
        self.running[run.key] = run
        self.jobs.started(spec, task)
        marker = read_marker(self.journal.log_path(spec.id, task.model))
        run.counted = (marker.count, marker.completion_tokens) if marker else (0, 0)
        if marker is not None and marker.count >= spec.total:
            log.info("%s/%s: every line already has a result; publishing", spec.id, task.model)
            self.finish(run, Status.COMPLETED)
            return
        shared = f", sharing with {len(self.running) - 1} other tasks" if len(self.running) > 1 else ""
        log.info("next: %s (%s) on %s: %s%s", spec.name, spec.id, task.model, choice.reason, shared)
        serving = self.registry.base_of(task.model)  # an adapter runs in its base's process
        if serving != task.model:
            problem = adapter_problem(self.layout.root, self.registry, task.model)
            if problem:
                self._fail_model(task.model, f"the adapter {task.model} cannot run here: {problem}")
                return
        if self.proc is not None and (
            self.proc.name != serving or not self.proc.alive() or task.model not in self.answers_for
        ):  # an adapter made after its base started needs the base started again
            self.end_model(f"{task.model} is needed next")
        if self.proc is None:
            self._load(serving)
        if self.proc is not None and run.key in self.running and not run.sent:
            run.sent = self.proc.send(
                p.Run(run.order(self.journal, self.registry, self.hunt_parts(run)))
            )  # while it loads too

    def _load(self, model: str) -> None:
        try:
            self.proc, config = open_model(self.layout, self.registry, model, self.memory_retry)
        except CannotLoad as exc:
            self._fail_model(model, str(exc))
            return
        self.answers_for = {model, *config.lora_adapters}
        for run in self.running.values():  # tasks of a process that was reloaded (memory retry)
            if self.registry.base_of(run.task.model) == model and not run.sent:
                run.sent = self.proc.send(p.Run(run.order(self.journal, self.registry, self.hunt_parts(run))))

    def end_model(self, why: str) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        started = time.time()
        seconds = proc.end(self.settings.stop_timeout_seconds)
        log.info("swap: ended %s (pid %d) in %.2fs because %s", proc.name, proc.pid, seconds, why)
        self.swaps.append({"model": proc.name, "unload_seconds": round(seconds, 3), "at": time.time()})
        self.history.swapped(proc.name, started, seconds)

    # -- giving slots back -------------------------------------------------------------------------
    def evict(self, key: str, why: str) -> None:
        """The task commits and goes back to the queue in its place; the others go on."""
        run = self.running.get(key)
        if run is None or run.leaving or self.proc is None:
            return
        log.info("slot: %s/%s gives up its slot: %s", run.task.job_id, run.task.model, why)
        run.leaving = why
        self.proc.send(p.Stop(run.key))

    def preempt(self, why: str, preemptor: Choice) -> None:
        """Stop feeding; the requests in flight finish (stop_timeout_seconds at most); every task goes
        back to the queue, the model process ends, and `preemptor` starts next."""
        if self.preempting is not None or self.proc is None:
            return
        held = ", ".join(sorted(self.running))
        log.info("preempt: %s/%s preempts %s: %s", preemptor.job_id, preemptor.model, held, why)
        self.preempting, self.next_choice = why, preemptor
        for run in self.running.values():
            run.leaving = run.leaving or why
        if not self.running:
            self.end_model(why)
            self.preempting = None
            return
        self.proc.send(p.Stop(grace_seconds=self.settings.stop_timeout_seconds))

    # -- events ------------------------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        proc = self.proc
        self.event_job = None
        if proc is None:
            return
        for ev in proc.events(timeout):
            self._event(ev)
            if self.proc is not proc:
                return
        for run in self.running.values():  # progress held back by the 2 s throttle, once it is due
            self._write_progress(run)
        busy = any(r.sent for r in self.running.values())
        why = proc.trouble(self.settings, busy=busy)
        if why is not None:
            for ev in proc.drain() if not proc.alive() else ():
                self._event(ev)
                if self.proc is not proc:
                    return
            if self.preempting is not None and not self.running:
                self._preempted()
                return
            self._died(proc, why)

    def _event(self, ev: p.Message) -> None:
        if isinstance(ev, p.Loaded):
            log.info("loaded %s in %.1fs (window %d)", self.proc.name, ev.load_seconds, ev.capacity)
            self.history.loaded(self.proc.name, time.time() - ev.load_seconds, ev.load_seconds)
            for run in self.running.values():
                if run.task.load_seconds is None:
                    run.task.load_seconds = ev.load_seconds
                    self.journal.save_task(run.task)
            return
        if isinstance(ev, p.LoadFailed):
            proc, self.proc = self.proc, None
            proc.end(self.settings.stop_timeout_seconds)
            self._load_failed(proc.name, ev.reason)
            return
        run = self.running.get(getattr(ev, "task_id", ""))
        self.event_job = run.task.job_id if run is not None else None
        if run is None:
            return
        if isinstance(ev, p.Resumed):
            for note in ev.notes:
                log.warning("recovery of %s: %s", run.key, note)
            if ev.kept:
                log.info("resuming %s after %d committed results", run.key, ev.kept)
        elif isinstance(ev, p.IoError):
            self._io_error = ev.message
        elif isinstance(ev, p.Progress):
            self._progress(run, ev)
        elif isinstance(ev, p.Running):
            self._hunt_part(run, ev)
        elif isinstance(ev, p.TaskDone):
            if ev.outcome == "failed":  # the engine refused the task's adapter: its tasks fail alone
                self._fail_model(run.task.model, f"the adapter {run.task.model} cannot run here: {ev.error}")
            elif ev.outcome == "crashed":  # copies of its model died too often with its shards
                self.finish(run, Status.FAILED, ev.error)
            else:
                self._task_done(run, ev.outcome)

    def _task_done(self, run: SlotTask, outcome: str) -> None:
        final = {"completed": Status.COMPLETED, "cancelled": run.cancel_outcome}.get(outcome)
        if run.cancelling and final is None:  # it gave up its slot just before the cancel arrived
            final = run.cancel_outcome
        if final is not None:
            self.finish(run, final)
        elif run.leaving:
            run.task.preemptions += 1
            self.back_since[run.task.queue_key] = time.time()
            self.requeue(run, run.leaving)
        else:
            self.requeue(run, "the daemon is stopping")
        if self.preempting is not None and not self.running:
            self._preempted()

    def _preempted(self) -> None:
        why, self.preempting = self.preempting, None
        self.end_model(why)

    def _progress(self, run: SlotTask, ev: p.Progress) -> None:
        requests, tokens = run.counted
        self.history.done(run.task.model, max(0, ev.count - requests), max(0, ev.completion_tokens - tokens))
        run.progressed(ev)
        self.history.task_progress(run.key, run.group, ev.count, ev.completion_tokens)
        run.unwritten = True
        self._write_progress(run)
        if run.due_progress_log():
            log.info(
                "progress %s/%s: %d/%d done, %d failed, %.0f tok/s over the last minute (group %s)",
                run.spec.name,
                run.task.model,
                ev.count,
                run.spec.total,
                ev.failed,
                run.recent_rate()[1],
                run.group,
            )

    # -- ending a task -----------------------------------------------------------------------------
    def _write_progress(self, run: SlotTask) -> None:
        """batch.json gets the task's progress at most every 2 s, and the last of a burst too (the
        task may commit nothing more for long: a request that hangs, a job waiting on a gate)."""
        if run.unwritten and run.due_batch_json():
            run.unwritten = False
            self.jobs.progressed(run.spec, run.task)

    def finish(self, run: SlotTask, outcome: Status, error: str | None = None) -> None:
        self.running.pop(run.key, None)
        self.history.task_ended(run.key)
        self.solo.discard(run.key)
        self.back_since.pop(run.task.queue_key, None)
        self.jobs.finalized(run.spec, run.task, outcome, error)

    def requeue(self, run: SlotTask, why: str) -> None:
        self.running.pop(run.key, None)
        self.history.task_ended(run.key)
        self.jobs.requeued(run.spec, run.task, why)

    def drop(self, job_id: str) -> None:
        """Forget the running tasks of a job that failed at its boundary, ending its model process."""
        runs = [r for r in self.running.values() if r.task.job_id == job_id]
        for run in runs:
            self.running.pop(run.key, None)
        if runs:
            self.end_model(f"job {job_id} failed")
            for run in list(self.running.values()):
                self.requeue(run, f"its model process ended because job {job_id} failed")

    def cancel(self, spec: JobSpec, outcome: Status = Status.CANCELLED) -> None:
        """Cancel a job (or expire it): queued tasks end now, the running ones at their next step."""
        # a job's base and adapter tasks may run at once (sections 12 and 13): each of them ends
        runs = [r for r in self.running.values() if r.task.job_id == spec.id]
        runs = [r for r in runs if r.cancel_outcome != Status.EXPIRED]  # not those already expiring
        if not runs and any(r.task.job_id == spec.id for r in self.running.values()):
            return
        models = self.jobs.cancelled(spec, [r.task for r in runs], outcome)
        verb = "cancel" if outcome == Status.CANCELLED else "expire"
        log.info("%s %s: %s", verb, spec.id, ", ".join(models) or "no queued task")
        for run in runs:
            if self.proc is not None and run.sent:
                run.cancel_outcome, run.cancelling = outcome, True
                self.proc.send(p.Cancel(run.key))
            else:
                self.finish(run, outcome)

    def stop(self) -> None:
        """Warm stop: the running tasks commit and go back in line; the model process ends."""
        if self.running and self.proc is not None and self.proc.alive():
            self.proc.send(p.Stop())
            deadline = time.monotonic() + self.settings.stop_timeout_seconds
            while self.running and time.monotonic() < deadline and self.proc and self.proc.alive():
                self.pump(0.2)
        for run in list(self.running.values()):
            self.requeue(run, "the daemon stopped")
        if self.proc is not None:
            self.proc.end(self.settings.stop_timeout_seconds)
            self.proc = None

    def abort_after_disk_error(self) -> None:
        if self.proc is not None:
            self.proc.end(self.settings.stop_timeout_seconds)
            self.proc = None
        self.running.clear()
        self.preempting = None

    # -- for the status snapshot -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "loaded_model": proc.name if proc and proc.loaded else None,
            "loading_model": proc.name if proc and not proc.loaded else None,
            "model_pid": None,
            "model_rss_mb": None,
            **(proc.describe() if proc else {}),
            "load_seconds": proc.load_seconds if proc else None,
            "running": [r.describe(self.running.values()) for r in self.running.values()],
            "preempting": self.preempting,
            "swaps": list(self.swaps),
        }
