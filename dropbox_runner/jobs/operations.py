"""Every change of a job's or a task's status, as named operations, and the one writer of batch.json.

The daemon, the CLI and the API call these; none of them writes a status or batch.json itself.
Each operation saves its task records, updates the queue, then writes batch.json once.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dropbox_runner.errors import is_environmental
from dropbox_runner.fsutil import fsync_dir, read_json_or_none, write_atomic, write_json
from dropbox_runner.jobs import retention
from dropbox_runner.layout import acquire_root
from dropbox_runner.queue import catalog
from dropbox_runner.queue.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.queue.lifecycle import FINAL, Status, job_status
from dropbox_runner.results import dedupe, webhooks
from dropbox_runner.results.batchfile import batch_document, write_batch_json, write_document
from dropbox_runner.results.compare import publish_compare
from dropbox_runner.results.log import read_marker, rewrite_without_failures
from dropbox_runner.results.publish import publish_task

log = logging.getLogger("dropbox_runner.jobs.operations")

INTERNAL_ERROR = "internal_error"


class Jobs:
    def __init__(self, journal: Journal, hooks: list[Any] | None = None) -> None:
        self.journal = journal
        self.layout = journal.layout
        self.hooks = hooks  # the webhook receivers; None: as models.yaml says when an event is due

    def _record(self, spec: JobSpec, tasks: list[TaskRecord]) -> dict:
        """batch.json, from the records as saved: the only place it is written."""
        return write_batch_json(self.journal, spec, tasks)

    def _final_record(self, spec: JobSpec, tasks: list[TaskRecord]) -> dict:
        """The final batch.json, its webhook event journaled first: a crash between the two replays
        the same event (its id comes from the job and its final state) instead of losing it."""
        document = batch_document(self.journal, spec, tasks)
        webhooks.announce(self.layout, document, sum(t.retries for t in tasks), self.hooks)
        write_document(self.journal, spec, document)
        return document

    # -- intake ------------------------------------------------------------------------------------
    def taken(self, spec: JobSpec) -> None:
        """A drop became a queued job: its spec, its task records, its queue entries."""
        self._record(spec, self.journal.create(spec))

    def rejected(self, spec: JobSpec) -> None:
        """A whole file was refused: the reasons go to batch.json, the original to the archive."""
        self.journal.save_spec(spec)
        self._final_record(spec, [])
        self.journal.archive(spec.id)

    # -- running -----------------------------------------------------------------------------------
    def started(self, spec: JobSpec, task: TaskRecord) -> None:
        task.move(Status.IN_PROGRESS)
        task.in_progress_at = task.in_progress_at or time.time()
        self.journal.save_task(task)
        self._record(spec, self.journal.tasks(spec))

    def progressed(self, spec: JobSpec, task: TaskRecord) -> None:
        """New results were committed (or the model's load time is known): counts and rates change."""
        self.journal.save_task(task)
        self._record(spec, self.journal.tasks(spec))

    def requeued(self, spec: JobSpec, task: TaskRecord, why: str) -> None:
        """Back in line (the model process died or the daemon stops); its queue entry never left."""
        if task.ending is not None:  # a cancel or expiry was asked while it ran: it ends instead
            self.finalized(spec, task, task.ending)
            return
        task.move(Status.QUEUED)
        self.journal.save_task(task)
        self._record(spec, self.journal.tasks(spec))
        log.info("%s/%s back in line: %s", task.job_id, task.model, why)

    def finalized(
        self,
        spec: JobSpec,
        task: TaskRecord,
        outcome: Status,
        error: str | None = None,
        code: str | None = None,
    ) -> None:
        """A task ended: its results are published; the job finishes with its last task."""
        self._finalize(spec, task, outcome, error, code)
        self._settle(spec)

    def _finalize(
        self, spec: JobSpec, task: TaskRecord, outcome: Status, error: str | None, code: str | None = None
    ) -> None:
        if task.ending is not None and outcome in (Status.CANCELLED, Status.EXPIRED):
            outcome = task.ending  # the first of a cancel and an expiry decides, not the last
        if task.status != Status.FINALIZING:
            task.move(Status.FINALIZING)
        task.outcome, task.hunt = outcome, []
        task.error, task.error_code = error or task.error, code or task.error_code
        self.journal.save_task(task)  # a crash while publishing publishes again at the next start
        publish_task(self.journal, spec, task, outcome)
        task.completed_at = time.time()
        task.move(outcome)
        self.journal.save_task(task)
        self.journal.dequeue(task)
        marker = read_marker(self.journal.log_path(spec.id, task.model))
        log.info(
            "published outbox/%s/%s.jsonl: %s, %d of %d done, %d failed",
            spec.outbox,
            task.model,
            outcome.value,
            marker.count if marker else 0,
            spec.total,
            marker.failed if marker else 0,
        )

    def _settle(self, spec: JobSpec) -> None:
        """Write batch.json; when every task is final, first the comparison, dedupe index and archive."""
        tasks = self.journal.tasks(spec)
        if not all(t.status.final for t in tasks):
            self._record(spec, tasks)
            return
        if len(spec.models) > 1:
            publish_compare(self.journal, spec)
        status = job_status([t.status for t in tasks])
        if status == Status.COMPLETED:
            dedupe.remember(self.journal, spec)
        self._final_record(spec, tasks)  # the last write for the job
        self.journal.archive(spec.id)
        log.info("job %s (%s) is %s: outbox/%s/", spec.id, spec.name, status.value, spec.outbox)

    def cancelled(
        self, spec: JobSpec, running: list[TaskRecord] | None = None, outcome: Status = Status.CANCELLED
    ) -> list[str]:
        """Cancel (or expire) every queued task of a job; returns their models. The running ones (a
        base and its adapters run at once) are the caller's: each is marked, so it ends with the first
        outcome asked, even after a crash."""
        for task in running or []:
            if task.ending is None and not task.status.final:
                task.ending = outcome
                self.journal.save_task(task)
        held = {task.model for task in running or []}
        ended = []
        for task in self.journal.tasks(spec):
            if task.status == Status.QUEUED and task.model not in held:
                self._finalize(spec, task, outcome, None)
                ended.append(task.model)
        if ended:
            self._settle(spec)
        return ended

    def due_to_expire(self, now: float) -> list[JobSpec]:
        """Unfinished jobs whose completion window has run out."""
        due = []
        for job_id in catalog.active_ids(self.layout):
            job = catalog.read_job(self.layout, job_id)
            expires_at = job.spec.get("expires_at") if job else None
            ending = [t.get("ending") for t in job.tasks if t.get("status") not in FINAL] if job else []
            if expires_at is not None and now >= expires_at and not all(ending):
                due.append(self.journal.spec(job_id))  # not one whose every open task already ends
        return due

    def retried(self, spec: JobSpec) -> list[str]:
        """Re-queue the failed lines of a finished job's tasks; returns the models re-queued.

        An intent record (`retry.json`) is written as the job leaves the archive, so a crash
        part-way is finished by `recover` instead of re-announcing the old final state.
        """
        tasks = self.journal.tasks(spec)
        if not all(t.status.final for t in tasks):
            return []
        again = {t.model: t.retries + 1 for t in tasks if self._has_failures(spec, t)}
        if not again:
            return []
        self.journal.unarchive(spec.id)
        write_json(self._retry_intent(spec.id), {"retries": again})
        self._apply_retry(spec, again)
        return list(again)

    def _has_failures(self, spec: JobSpec, task: TaskRecord) -> bool:
        marker = read_marker(self.journal.log_path(spec.id, task.model))
        return marker is None or marker.failed > 0 or marker.count < spec.total

    def _retry_intent(self, job_id: str) -> Path:
        return self.layout.active_job(job_id).retry

    def _apply_retry(self, spec: JobSpec, again: dict[str, int]) -> None:
        """Each step idempotent: a task already at its new retry count is not re-queued twice."""
        tasks = self.journal.tasks(spec)
        for task in tasks:
            target = again.get(task.model)
            if target is None:
                continue
            if task.retries < target:
                dropped = rewrite_without_failures(self.journal.log_path(spec.id, task.model), spec.total)
                log.info("retry %s/%s: %d failed lines will run again", spec.id, task.model, dropped)
                task.move(Status.QUEUED)
                task.retries = target
                task.crashes, task.poison, task.hunt, task.suspect_until = 0, [], [], -1
                task.narrowings = 0
                task.error = task.error_code = task.outcome = task.completed_at = task.ending = None
                self.journal.save_task(task)
            if task.status == Status.QUEUED:
                self.journal.enqueue(task)
        self._record(spec, tasks)
        self._retry_intent(spec.id).unlink(missing_ok=True)

    def failed_internal(self, job_id: str, message: str) -> None:
        """The job boundary: an unexpected error fails this job alone, with what is done published.

        If even that fails, the job's folder is set aside in state/quarantine/ with the reason.
        """
        message = message[:500]
        log.error("job %s fails with internal_error: %s", job_id, message)
        try:
            spec = self.journal.spec(job_id)
            for task in self.journal.tasks(spec):
                if not task.status.final:
                    self._fail_task(spec, task, message)
            self._settle(spec)
        except Exception as exc:  # the job's own records are broken: set it aside whole
            log.exception("job %s cannot be failed cleanly; quarantining it", job_id)
            self.quarantine(job_id, f"{message}; then, while failing the job: {exc}")

    def _fail_task(self, spec: JobSpec, task: TaskRecord, message: str) -> None:
        try:
            self._finalize(spec, task, Status.FAILED, message, INTERNAL_ERROR)
        except Exception:  # publishing is what fails: the status still ends failed
            log.exception("publishing %s/%s failed", spec.id, task.model)
            if not task.status.final:  # queued or running: through finalizing, as the table says
                task.move(Status.FINALIZING)
            task.move(Status.FAILED)
            task.error, task.error_code = message, INTERNAL_ERROR
            task.completed_at = time.time()
            self.journal.save_task(task)
            self.journal.dequeue(task)

    def quarantine(self, job_id: str, reason: str) -> None:
        """Move a job's folder to state/quarantine/<id>/ with reason.txt; it is never replayed."""
        target = self.layout.quarantined_job(job_id)
        target.path.mkdir(parents=True, exist_ok=True)
        folder = self.layout.active_job(job_id).path
        if folder.is_dir():
            for entry in os.listdir(folder):
                os.replace(folder / entry, target.path / entry)
            shutil.rmtree(folder, ignore_errors=True)
        write_atomic(target.reason, reason.encode("utf-8", "replace") + b"\n")
        self.journal.dequeue_job(job_id)
        fsync_dir(self.layout.quarantine)
        log.error("quarantined %s in state/quarantine/%s/: %s", job_id, job_id, reason)

    def pruned(self, keep_days: float | None, now: float) -> list[str]:
        """Remove finished jobs past keep_finished_days or their own output_expires_after (see
        `retention`); returns their ids."""
        return retention.prune(self.journal, keep_days, now)

    # -- recovery at start -------------------------------------------------------------------------
    def recover(self) -> None:
        """Put tasks whose process died back in line; finish interrupted publishing; drop stale entries."""
        queued_keys = {k for k, _, _ in self.journal.queued()}
        for job_id in catalog.active_ids(self.layout):
            try:
                self._recover_job(job_id, queued_keys)
            except Exception as exc:
                if is_environmental(exc):  # a full disk fails no job: the daemon pauses, then recovers
                    raise
                self.failed_internal(job_id, f"recovery at start failed: {exc}")
        for key, job_id, model in self.journal.queued():
            self.journal.dequeue_if_stale(key, job_id, model)

    def _recover_job(self, job_id: str, queued_keys: set[str]) -> None:
        spec = self.journal.spec(job_id)
        intent = read_json_or_none(self._retry_intent(job_id))
        if isinstance(intent, dict) and isinstance(intent.get("retries"), dict):
            log.info("finishing the retry of %s (it was interrupted)", job_id)
            self._apply_retry(spec, intent["retries"])
        for task in self.journal.tasks(spec):
            if task.ending is not None and task.status in (Status.IN_PROGRESS, Status.QUEUED):
                log.info(
                    "%s/%s: ending it %s, as asked before the last daemon ended",
                    job_id,
                    task.model,
                    task.ending,
                )
                self._finalize(spec, task, task.ending, None)
                continue
            if task.status == Status.IN_PROGRESS:
                log.info("%s/%s was running when the last daemon ended; back in line", job_id, task.model)
                task.move(Status.QUEUED)
                self.journal.save_task(task)
            if task.status == Status.QUEUED and task.queue_key not in queued_keys:
                self.journal.enqueue(task)
            if task.status == Status.FINALIZING:
                log.info("republishing %s/%s (publishing was interrupted)", job_id, task.model)
                self._finalize(spec, task, task.outcome or Status.COMPLETED, None)
            elif task.status.final:
                self.journal.dequeue(task)
        self._settle(spec)


# -- requests from the CLI and the API ---------------------------------------------------------------
def request(journal: Journal, op: str, job_id: str) -> None:
    write_json(journal.layout.control_request(op, job_id), {"op": op, "job_id": job_id, "at": time.time()})


def operate(journal: Journal, spec: JobSpec, op: str) -> tuple[bool, list[str]]:
    """Cancel or retry a job now if no daemon runs (taking its lock), else ask the daemon.

    Returns (done now, models concerned); a retry of an unfinished job raises RunnerError.
    """
    from dropbox_runner.errors import LockHeld, RunnerError

    if op == "retry" and not all(t.status.final for t in journal.tasks(spec)):
        raise RunnerError(f"{spec.name} is not finished yet; retry it once it is.")
    try:
        lock = acquire_root(journal.layout)
    except LockHeld:
        request(journal, op, spec.id)
        return False, []
    try:
        jobs = Jobs(journal)
        return True, jobs.cancelled(spec) if op == "cancel" else jobs.retried(spec)
    finally:
        lock.release()
