"""Job operations shared by the daemon and the CLI: finalize a task, finish a job, cancel, retry.

The CLI writes a request into `state/control/`; the daemon (or the CLI itself, when it can take the
daemon's lock because no daemon runs) carries it out with these functions.
"""

from __future__ import annotations

import logging
import time

from dropbox_runner.fsutil import write_json
from dropbox_runner.intake.claim import record_completed
from dropbox_runner.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.lifecycle import Status, job_status
from dropbox_runner.results.compare import publish_compare
from dropbox_runner.results.log import read_marker, rewrite_without_failures
from dropbox_runner.results.publish import publish_task, write_batch_json

log = logging.getLogger("dropbox_runner.control")


def finalize_task(
    journal: Journal, spec: JobSpec, task: TaskRecord, outcome: Status, error: str | None = None
) -> None:
    """Publish a task's results and record its final status; the job finishes with its last task."""
    if task.status != Status.FINALIZING:
        task.move(Status.FINALIZING)
    task.outcome = outcome
    task.error = error or task.error
    journal.save_task(task)
    write_batch_json(journal, spec)
    publish_task(journal, spec, task, outcome)
    task.completed_at = time.time()
    task.move(outcome)
    journal.save_task(task)
    journal.dequeue(task)
    marker = read_marker(journal.log_path(spec.id, task.model))
    log.info(
        "published outbox/%s/%s.jsonl: %s, %d of %d done, %d failed",
        spec.outbox,
        task.model,
        outcome.value,
        marker.count if marker else 0,
        spec.total,
        marker.failed if marker else 0,
    )
    tasks = journal.tasks(spec)
    if all(t.status.final for t in tasks):
        finish_job(journal, spec, tasks)
    else:
        write_batch_json(journal, spec, tasks)


def finish_job(journal: Journal, spec: JobSpec, tasks: list[TaskRecord]) -> None:
    if len(spec.models) > 1:
        publish_compare(journal, spec)
    status = job_status([t.status for t in tasks])
    if status == Status.COMPLETED:
        record_completed(journal, spec)
    write_batch_json(journal, spec, tasks)  # the last write for the job
    journal.archive(spec.id)
    log.info("job %s (%s) is %s: outbox/%s/", spec.id, spec.name, status.value, spec.outbox)


def cancel_queued(journal: Journal, spec: JobSpec, running: TaskRecord | None) -> list[str]:
    """Cancel every task of a job that is not running; returns their models. The running one is the caller's."""
    cancelled = []
    for task in journal.tasks(spec):
        if task.status == Status.QUEUED and not (
            running and running.model == task.model and running.job_id == task.job_id
        ):
            finalize_task(journal, spec, task, Status.CANCELLED)
            cancelled.append(task.model)
    return cancelled


def retry(journal: Journal, spec: JobSpec) -> list[str]:
    """Re-queue the failed lines of a finished job's tasks; returns the models re-queued."""
    tasks = journal.tasks(spec)
    if not all(t.status.final for t in tasks):
        return []
    journal.unarchive(spec.id)
    again = []
    for task in tasks:
        marker = read_marker(journal.log_path(spec.id, task.model))
        if marker is not None and marker.failed == 0 and marker.count >= spec.total:
            continue
        dropped = rewrite_without_failures(journal.log_path(spec.id, task.model), spec.total)
        log.info("retry %s/%s: %d failed lines will run again", spec.id, task.model, dropped)
        task.move(Status.QUEUED)
        task.retries += 1
        task.crashes, task.poison, task.isolate_until, task.suspect_until = 0, [], -1, -1
        task.error = task.outcome = task.completed_at = None
        journal.save_task(task)
        journal.enqueue(task)
        again.append(task.model)
    if not again:
        journal.archive(spec.id)
    else:
        write_batch_json(journal, spec)
    return again


def request(journal: Journal, op: str, job_id: str) -> None:
    write_json(
        journal.layout.control / f"{op}-{job_id}.json", {"op": op, "job_id": job_id, "at": time.time()}
    )


def operate(journal: Journal, spec: JobSpec, op: str) -> tuple[bool, list[str]]:
    """Cancel or retry a job now if no daemon runs (taking its lock), else ask the daemon.

    Returns (done now, models concerned); a retry of an unfinished job raises RunnerError.
    """
    from dropbox_runner.daemon import acquire_root
    from dropbox_runner.errors import LockHeld, RunnerError

    if op == "retry" and not all(t.status.final for t in journal.tasks(spec)):
        raise RunnerError(f"{spec.name} is not finished yet; retry it once it is.")
    try:
        lock = acquire_root(journal.layout)
    except LockHeld:
        request(journal, op, spec.id)
        return False, []
    try:
        return True, cancel_queued(journal, spec, None) if op == "cancel" else retry(journal, spec)
    finally:
        lock.release()
