"""The model slot's failures: a load that fails (once more with less memory where that is why), a
model that cannot run, and a model process that dies or hangs with the tasks it held (the crash
policy itself is `crashes`).
"""

from __future__ import annotations

import logging

from dropbox_runner.config import EngineKind
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.results.log import first_missing, read_fed_mark
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
        alone = next(((k, i) for k, i in proc.alone.items() if k in self.running), None)
        suspects = crashes.suspects(marks, alone[0] if alone else None)
        if len(suspects) > 1:
            note = crashes.shared_crash(suspects, marks, self.shared_crash, self.solo)
            log.error(
                "the model process of %s %s with %d tasks in flight: %s", proc.name, why, len(suspects), note
            )
        for run in runs:
            if run.key in suspects and len(suspects) == 1:
                self._crashed(run, alone[1] if alone else None, marks[run.key], why)
            else:
                self.requeue(run, "restarting the model process and resuming from the last commit")

    def _crashed(self, run: SlotTask, alone: int | None, marks: tuple[int, int], why: str) -> None:
        task = run.task
        verdict = crashes.after_crash(task, alone, marks[0], marks[1], why)
        log.error("the model process %s during %s (crash %d): %s", why, run.key, task.crashes, verdict.note)
        if verdict.give_up:
            self.finish(run, Status.FAILED, verdict.note)
        else:
            self.journal.save_task(task)
            self.requeue(run, "restarting the model process and resuming from the last commit")
