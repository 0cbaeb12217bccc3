"""batch.json: the job as an OpenAI-style batch object, built from its spec, task records and markers.

Only `jobs` calls `write_batch_json` and `write_document`: every change of a job writes it once, through here.
"""

from __future__ import annotations

import time
from typing import Any

from dropbox_runner.fsutil import write_json
from dropbox_runner.layout import OutboxFolder
from dropbox_runner.queue.counts import shown_job_status, task_counts
from dropbox_runner.queue.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.results.log import Marker, read_marker


def model_entry(spec: JobSpec, task: TaskRecord, marker: Marker | None) -> dict[str, Any]:
    """One model of batch.json; counts and rates as `status` shows them (queue.counts)."""
    counts = task_counts(
        spec.total, task.status, task.completed_at, marker.model_dump() if marker else None, time.time()
    )
    usage = counts["usage"]
    return {
        "status": task.status.value,
        "request_counts": {"total": spec.total, "completed": counts["succeeded"], "failed": counts["failed"]},
        "output_file": OutboxFolder.output_name(task.model),
        "error_file": OutboxFolder.errors_name(task.model),
        "usage": usage_block(usage["prompt_tokens"], usage["completion_tokens"], usage["cached_tokens"]),
        "tokens_per_second": counts["tokens_per_second"],
        "load_seconds": task.load_seconds,
        "started_at": _int(marker.started_at if marker else None),
        "completed_at": _int(task.completed_at),
        "error": task.error,
    }


def usage_block(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """Chat's names (prompt/completion) beside the batch object's (input/output), one set of counts."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "input_tokens": prompt,
        "output_tokens": completion,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens_details": {"reasoning_tokens": 0},  # no model here reasons apart from its answer
    }


def summed_usage(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The usage of several models (or of none) added up."""
    return usage_block(
        sum(e["prompt_tokens"] for e in entries),
        sum(e["completion_tokens"] for e in entries),
        sum(e["prompt_tokens_details"]["cached_tokens"] for e in entries),
    )


def _int(t: float | None) -> int | None:
    return int(t) if t is not None else None


def batch_document(journal: Journal, spec: JobSpec, tasks: list[TaskRecord]) -> dict[str, Any]:
    """The OpenAI-style batch object of a job."""
    models = {t.model: model_entry(spec, t, read_marker(journal.log_path(spec.id, t.model))) for t in tasks}
    status = shown_job_status(bool(spec.rejected), [(t.status, t.preemptions) for t in tasks])
    counts = {"total": 0, "completed": 0, "failed": 0}
    for entry in models.values():
        for k in counts:
            counts[k] += entry["request_counts"][k]
    if spec.rejected:
        counts = {"total": spec.total, "completed": 0, "failed": spec.total}
    done_at = max((t.completed_at or 0 for t in tasks), default=0) or (
        spec.created_at if spec.rejected else None
    )
    starts = [t.in_progress_at for t in tasks if t.in_progress_at]
    errors = [{"code": "invalid_file", "message": r, "line": None} for r in spec.rejected]
    errors += [
        {"code": t.error_code, "message": f"{t.model}: {t.error}", "line": None}
        for t in tasks
        if t.error_code == "internal_error"
    ]
    errors += spec.line_errors
    return {
        "id": spec.id,
        "object": "batch",
        "endpoint": None,
        "input_file": f"{spec.name}.jsonl",
        "completion_window": spec.completion_window,
        "status": status.value,
        "output_folder": spec.outbox,
        "created_at": int(spec.created_at),
        "in_progress_at": _int(min(starts)) if starts else None,
        "finalizing_at": None,
        "completed_at": _int(done_at) if status == Status.COMPLETED else None,
        "failed_at": _int(done_at) if status == Status.FAILED else None,
        "cancelled_at": _int(done_at) if status == Status.CANCELLED else None,
        "expires_at": _int(spec.expires_at),
        "expired_at": _int(done_at) if status == Status.EXPIRED else None,
        "request_counts": counts,
        "usage": summed_usage([e["usage"] for e in models.values()]),
        "models": models,
        "metadata": spec.metadata,
        "dedupe_of": spec.dedupe_of,
        "errors": {"object": "list", "data": errors} if errors else None,
        "updated_at": round(time.time(), 3),
    }


def write_batch_json(journal: Journal, spec: JobSpec, tasks: list[TaskRecord]) -> dict[str, Any]:
    return write_document(journal, spec, batch_document(journal, spec, tasks))


def write_document(journal: Journal, spec: JobSpec, document: dict[str, Any]) -> dict[str, Any]:
    out_dir = journal.layout.outbox_folder(spec.outbox)
    out_dir.path.mkdir(parents=True, exist_ok=True)
    write_json(out_dir.batch, document)
    return document
