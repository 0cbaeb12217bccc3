"""Publishing: a task's log becomes `outbox/<name>/<model>.jsonl` in input order, and batch.json.

Memory is bounded by the line count (an array of offsets); every file appears whole.
"""

from __future__ import annotations

import os
import time
from array import array
from contextlib import ExitStack
from typing import Any

import orjson

from dropbox_runner.fsutil import fsync_dir, write_json
from dropbox_runner.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.lifecycle import Status, job_status
from dropbox_runner.requests import iter_raw_lines
from dropbox_runner.results.log import Marker, committed_records, read_marker
from dropbox_runner.results.records import failure_line, request_ids
from dropbox_runner.status import model_row

MISSING_REASON = {
    Status.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    Status.FAILED: ("engine_failed", "the model could not run this request"),
}


def _custom_id(data: bytes | None) -> str | None:
    if not data:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def publish_task(journal: Journal, spec: JobSpec, task: TaskRecord, final: Status) -> None:
    """Write `<model>.jsonl` (every line, in order) and `<model>.errors.jsonl` (failed lines, if any)."""
    log_path = journal.log_path(spec.id, task.model)
    offsets = array("q", [-1]) * spec.total
    present = 0
    for r in committed_records(log_path):
        offsets[r.index] = r.offset
        present += 1
    out_dir = journal.layout.outbox / spec.outbox
    out_path = out_dir / f"{task.model}.jsonl"
    err_path = out_dir / f"{task.model}.errors.jsonl"
    tmp_out = out_dir / f".{out_path.name}.tmp"
    tmp_err = out_dir / f".{err_path.name}.tmp"
    code, message = MISSING_REASON.get(final, ("engine_lost", "this request was not run"))
    if task.error and final == Status.FAILED:
        message = task.error
    failures = 0
    with ExitStack() as stack:
        logf = stack.enter_context(open(log_path, "rb")) if present else None
        out = stack.enter_context(open(tmp_out, "wb"))
        err = stack.enter_context(open(tmp_err, "wb"))
        # The input is read only when some line has no result: its custom_id goes on the failure line.
        inputs = (
            iter_raw_lines(stack.enter_context(open(journal.input_path(spec.id), "rb")))
            if present < spec.total
            else None
        )
        for index in range(spec.total):
            raw = next(inputs) if inputs is not None else None
            off = offsets[index]
            if off >= 0:
                logf.seek(off)
                _, _, rest = logf.readline().partition(b" ")
                flag, _, rest = rest.partition(b" ")
                line = rest.split(b" ", 3)[3]
                failed = flag == b"e"
            else:
                ids = request_ids(spec.id, task.model, index)
                line = failure_line(_custom_id(raw.data), code, message, ids) + b"\n"
                failed = True
            out.write(line)
            if failed:
                err.write(line)
                failures += 1
        for f in (out, err):
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp_out, out_path)
    if failures:
        os.replace(tmp_err, err_path)
    else:
        tmp_err.unlink()
        err_path.unlink(missing_ok=True)
    fsync_dir(out_dir)


def model_entry(spec: JobSpec, task: TaskRecord, marker: Marker | None) -> dict[str, Any]:
    """One model of batch.json; counts and rates as `status` computes them."""
    row = model_row(
        spec.model_dump(), task.model_dump(mode="json"), marker.model_dump() if marker else None, time.time()
    )
    usage = row["usage"]
    return {
        "status": task.status.value,
        "request_counts": {"total": spec.total, "completed": row["succeeded"], "failed": row["failed"]},
        "output_file": f"{task.model}.jsonl",
        "error_file": f"{task.model}.errors.jsonl",
        "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        "tokens_per_second": row["tokens_per_second"],
        "load_seconds": task.load_seconds,
        "started_at": _int(marker.started_at if marker else None),
        "completed_at": _int(task.completed_at),
        "error": task.error,
    }


def _int(t: float | None) -> int | None:
    return int(t) if t is not None else None


def batch_object(journal: Journal, spec: JobSpec, tasks: list[TaskRecord]) -> dict[str, Any]:
    """The OpenAI-style batch object of a job, from its spec, task records and markers."""
    models = {t.model: model_entry(spec, t, read_marker(journal.log_path(spec.id, t.model))) for t in tasks}
    status = Status.FAILED if spec.rejected else job_status([t.status for t in tasks])
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
    errors += spec.line_errors
    return {
        "id": spec.id,
        "object": "batch",
        "endpoint": None,
        "input_file": f"{spec.name}.jsonl",
        "completion_window": "24h",
        "status": status.value,
        "output_folder": spec.outbox,
        "created_at": int(spec.created_at),
        "in_progress_at": _int(min(starts)) if starts else None,
        "finalizing_at": None,
        "completed_at": _int(done_at) if status == Status.COMPLETED else None,
        "failed_at": _int(done_at) if status == Status.FAILED else None,
        "cancelled_at": _int(done_at) if status == Status.CANCELLED else None,
        "expires_at": None,
        "expired_at": None,
        "request_counts": counts,
        "models": models,
        "metadata": spec.metadata,
        "dedupe_of": spec.dedupe_of,
        "errors": {"object": "list", "data": errors} if errors else None,
        "updated_at": round(time.time(), 3),
    }


def write_batch_json(
    journal: Journal, spec: JobSpec, tasks: list[TaskRecord] | None = None
) -> dict[str, Any]:
    obj = batch_object(journal, spec, tasks if tasks is not None else journal.tasks(spec))
    out_dir = journal.layout.outbox / spec.outbox
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "batch.json", obj)
    return obj
