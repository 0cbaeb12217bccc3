"""The model slot's failures: a load that fails (once more with less memory where that is why), a
model that cannot run, and a model process that dies or hangs with the tasks it held (the crash
policy itself is `crashes`).
"""

from __future__ import annotations

import logging

from dropbox_runner import protocol as p
from dropbox_runner.config import EngineKind
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.results.log import first_missing, missing_between, read_fed_mark
from dropbox_runner.slot import crashes
from dropbox_runner.slot.memory import is_memory_failure
from dropbox_runner.slot.supervisor import ModelProcess
from dropbox_runner.slot.task import SlotTask

log = logging.getLogger("dropbox_runner.daemon")

LOAD_ATTEMPTS = 3  # a model process killed while loading is started again, this many times in all


class SlotFailures:
    """Mixed into `Execution`: it owns the state these methods read and change."""

    def _load_failed(self, model: str, reason: str) -> None:
        log.error("%s could not load: %s", model, reason)
        config = self.registry.models[model]
        if config.engine == EngineKind.VLLM and is_memory_failure(reason):
            util = crashes.memory_retry_utilization(config.engine_args, model in self.memory_retry)
            if util is not None:
                self.memory_retry[model] = util
                log.warning("retrying %s once with gpu_memory_utilization %.3f", model, util)
                for run in self.running.values():
                    run.sent = False
                self._load(model)
                return
        self._fail_model(model, f"the model {model} could not load: {reason}")

    def _fail_model(self, model: str, message: str) -> None:
        """Fail the running tasks and every queued task of a model that cannot run; the queue moves on."""
        log.error("failing the tasks of %s: %s", model, message)
        served = {model, *self.registry.adapters_of(model)}  # a base that cannot run fails its adapters
        for run in [r for r in self.running.values() if r.task.model in served]:
            self.finish(run, Status.FAILED, message)
        for _, job_id, m in self.journal.queued():
            if m in served:
                spec = self.journal.spec(job_id)
                self.jobs.finalized(spec, self.journal.task(job_id, m), Status.FAILED, message)

    def _died(self, proc: ModelProcess, why: str) -> None:
        self.proc, self.preempting = None, None
        proc.end(1.0)
        runs = list(self.running.values())
        if not runs:
            log.warning("the model process of %s %s while idle", proc.name, why)
            return
        if self._io_error:
            self.pause_reason, self._io_error = f"{self._io_error}; nothing committed is lost", None
            for run in runs:
                self.requeue(run, "it resumes once the disk accepts writes again")
            return
        if not proc.loaded:
            deaths = self.load_deaths[proc.name] = self.load_deaths.get(proc.name, 0) + 1
            if deaths < LOAD_ATTEMPTS:
                for run in runs:
                    self.requeue(run, f"the model process {why} while loading; loading it again")
            else:
                self._load_failed(proc.name, f"the model process {why} while loading, {deaths} times")
            return
        self.load_deaths.pop(proc.name, None)
        marks = {}
        for run in runs:
            log_path = self.journal.log_path(run.task.job_id, run.task.model)
            marks[run.key] = (first_missing(log_path), read_fed_mark(log_path))
        trial = next(((k, part) for k, part in proc.trials.items() if k in self.running), None)
        suspects = crashes.suspects(marks, trial[0] if trial else None)
        hunts: dict[str, list[int]] = {}
        if len(suspects) > 1:
            note, hunts = crashes.shared_crash(suspects, marks, self.shared_crash)
            log.error(
                "the model process of %s %s with %d tasks in flight: %s", proc.name, why, len(suspects), note
            )
        for run in runs:
            if run.key in suspects and len(suspects) == 1:
                self._crashed(run, trial[1] if trial else None, marks[run.key], why)
                continue
            if run.key in hunts:  # no crash counted: the hunt finds whose line it was
                run.task.hunt = hunts[run.key]
                self._hunt_changed(run)
            self.requeue(run, "restarting the model process and resuming from the last commit")

    def _crashed(self, run: SlotTask, part: list[int] | None, marks: tuple[int, int], why: str) -> None:
        task = run.task
        log_path = self.journal.log_path(task.job_id, task.model)
        trial = missing_between(log_path, *part) if part else None  # the part's lines still without a result
        verdict = crashes.after_crash(task, trial, marks[0], marks[1], why)
        log.error("the model process %s during %s (crash %d): %s", why, run.key, task.crashes, verdict.note)
        if verdict.give_up:
            self.finish(run, Status.FAILED, verdict.note)
        else:
            self._hunt_changed(run)
            self.requeue(run, "restarting the model process and resuming from the last commit")

    # -- culprit hunts (crashes.halves): a task with a hunt runs alone -----------------------------
    def _hunt_changed(self, run: SlotTask) -> None:
        self.journal.save_task(run.task)  # the hunt survives a restart of the daemon
        (self.solo.add if run.task.hunt else self.solo.discard)(run.key)

    def hunt_parts(self, run: SlotTask) -> list[list[int]]:
        """The parts of the task's hunt for its model process to run alone in turn (see `SlotTask.order`); a
        task with a hunt is marked to run alone (`solo`)."""
        task = run.task
        if not task.hunt:
            return []
        log_path = self.journal.log_path(task.job_id, task.model)
        suspects = missing_between(log_path, *task.hunt)
        parts = crashes.halves(suspects)
        if parts:
            log.info(
                "culprit hunt of %s: %d suspect lines in %d-%d, halved alone",
                run.key,
                len(suspects),
                *task.hunt,
            )
        else:
            task.hunt = []  # every suspect has a result (the last daemon ended after the hunt)
        self._hunt_changed(run)
        return parts

    def _hunt_part(self, run: SlotTask, ev: p.Running) -> None:
        """The model process started a part of the task's hunt, or ended the hunt clean."""
        if ev.index is not None:
            log.info("culprit hunt of %s: lines %d-%d run alone", run.key, ev.index, ev.last)
            return
        log.info("culprit hunt of %s: every part ended clean; no line is to blame", run.key)
        run.task.hunt = []
        self._hunt_changed(run)

    def recover_hunts(self) -> None:
        """At start: the queued tasks whose record holds a hunt (the last daemon ended in one) run alone."""
        for _, job_id, model in self.journal.queued():
            try:
                if self.journal.task(job_id, model).hunt:
                    self.solo.add(f"{job_id}/{model}")
            except (FileNotFoundError, ValueError):
                continue
