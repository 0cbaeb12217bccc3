"""Publishing: a task's log becomes `outbox/<name>/<model>.jsonl` in input order.

Memory is bounded by the line count (an array of offsets); every file appears whole.
"""

from __future__ import annotations

from array import array
from contextlib import ExitStack
from typing import BinaryIO

import orjson

from dropbox_runner.errors import fault_point
from dropbox_runner.fsutil import fsync_dir, staged
from dropbox_runner.lines.parse import iter_raw_lines
from dropbox_runner.queue.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.results.log import committed_records, decode_record
from dropbox_runner.results.records import failure_line, request_ids

MISSING_REASON = {
    Status.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    Status.FAILED: ("engine_failed", "the model could not run this request"),
    Status.EXPIRED: ("batch_expired", "the batch expired (completion_window) before this request ran"),
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
    fault_point("publish", spec.name)
    log_path = journal.log_path(spec.id, task.model)
    offsets = array("q", [-1]) * spec.total
    present = 0
    for r in committed_records(log_path):
        offsets[r.index] = r.offset
        present += 1
    out_dir = journal.layout.outbox_folder(spec.outbox)
    err_path = out_dir.errors(task.model)
    code, message = MISSING_REASON.get(final, ("engine_lost", "this request was not run"))
    if task.error and final == Status.FAILED:
        code, message = task.error_code or code, task.error
    failures = 0
    with ExitStack() as stack:
        logf = stack.enter_context(open(log_path, "rb")) if present else None
        out = stack.enter_context(staged(out_dir.output(task.model)))
        err = stack.enter_context(staged(err_path))
        # The input is read only when some line has no result: its custom_id goes on the failure line.
        inputs = (
            iter_raw_lines(stack.enter_context(open(journal.input_path(spec.id), "rb")))
            if present < spec.total
            else None
        )
        for index in range(spec.total):
            raw = next(inputs, None) if inputs is not None else None
            off = offsets[index]
            record = decode_record(_line_at(logf, off), off) if off >= 0 else None
            if record is not None:
                line, failed = record.payload + b"\n", not record.ok
            else:
                ids = request_ids(spec.id, task.model, index)
                line = failure_line(_custom_id(raw.data if raw else None), code, message, ids) + b"\n"
                failed = True
            out.write(line)
            if failed:
                err.write(line)
                failures += 1
        err.discard = not failures
    if not failures and err_path.exists():  # a retry left no failed line
        err_path.unlink()
        fsync_dir(out_dir.path)


def _line_at(f: BinaryIO, offset: int) -> bytes:
    f.seek(offset)
    return f.readline()
