"""Job and task statuses and the only transitions allowed between them.

Statuses are str Enums whose values are those of the OpenAI batch object.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})

_ALLOWED: dict[Status, frozenset[Status]] = {
    # queued -> finalizing: cancelled, or failed because its model cannot run, before it started
    Status.QUEUED: frozenset({Status.IN_PROGRESS, Status.FINALIZING}),
    # in_progress -> queued: the model process died or the daemon stopped mid-task
    Status.IN_PROGRESS: frozenset({Status.QUEUED, Status.FINALIZING}),
    Status.FINALIZING: frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.EXPIRED}),
    # retry re-opens a finished task
    Status.COMPLETED: frozenset({Status.QUEUED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.CANCELLED: frozenset({Status.QUEUED}),
    Status.EXPIRED: frozenset({Status.QUEUED}),
}


class BadTransition(ValueError):
    pass


def transition(current: Status, new: Status) -> Status:
    if new == current or new in _ALLOWED[current]:
        return new
    raise BadTransition(f"a task cannot go from {current} to {new}")


def job_status(task_statuses: list[Status]) -> Status:
    """A job's status from its tasks': the least advanced task decides, then the outcome."""
    if not task_statuses:
        return Status.FAILED
    if any(s == Status.IN_PROGRESS for s in task_statuses):
        return Status.IN_PROGRESS
    if any(s == Status.QUEUED for s in task_statuses):
        return Status.IN_PROGRESS if any(s.final for s in task_statuses) else Status.QUEUED
    if any(s == Status.FINALIZING for s in task_statuses):
        return Status.FINALIZING
    if any(s == Status.EXPIRED for s in task_statuses):
        return Status.EXPIRED
    if any(s == Status.CANCELLED for s in task_statuses):
        return Status.CANCELLED
    if all(s == Status.FAILED for s in task_statuses):
        return Status.FAILED
    return Status.COMPLETED
