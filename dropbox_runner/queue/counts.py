"""A task's counts and rates from its record and commit marker, and the status a job shows: the one
arithmetic that batch.json (`results.batchfile`) and `status` (`status.view`) both report.

Pure: plain dicts in (the records as JSON), numbers out, the time given; no file is read here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dropbox_runner.queue.lifecycle import Status, job_status


def task_counts(
    total: int, status: str, completed_at: float | None, marker: Mapping[str, Any] | None, now: float
) -> dict[str, Any]:
    """Lines done, succeeded and failed (a finished task's unanswered lines count as failed), tokens
    and lines per second since it started, the ETA at that rate, and the token usage."""
    m = marker or {}
    count, failed = m.get("count", 0), m.get("failed", 0)
    started, updated = m.get("started_at"), m.get("updated_at")
    final = Status(status).final
    end = completed_at if final else (updated or now)
    elapsed = (end or now) - started if started else 0.0
    tps = m.get("completion_tokens", 0) / elapsed if elapsed > 0 else 0.0
    rate = count / elapsed if elapsed > 0 else 0.0
    remaining = total - count
    eta = remaining / rate if rate > 0 and not final and status != Status.QUEUED else None
    return {
        "done": count,
        "succeeded": count - failed,
        "failed": failed + (remaining if final else 0),
        "tokens_per_second": round(tps, 1),
        "eta_seconds": eta,  # None while queued (waiting, or preempted: no rate to go by) or ended
        "checkpoint_age_seconds": round(now - updated, 1) if updated else None,
        "usage": {
            "prompt_tokens": m.get("prompt_tokens", 0),
            "completion_tokens": m.get("completion_tokens", 0),
            "cached_tokens": m.get("cached_tokens", 0),
        },
    }


def shown_status(status: str, preemptions: int | None) -> Status:
    """A preempted task waits in the queue, and its job stays in progress (CONTRACT section 12)."""
    status = Status(status)
    return Status.IN_PROGRESS if status == Status.QUEUED and preemptions else status


def shown_job_status(rejected: bool, tasks: Iterable[tuple[str, int | None]]) -> Status:
    """A job's status as batch.json and `status` show it, from its tasks' (status, preemptions)."""
    if rejected:
        return Status.FAILED
    return job_status([shown_status(s, p) for s, p in tasks])
