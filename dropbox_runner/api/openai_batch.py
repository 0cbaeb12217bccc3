"""OpenAI's batch object for one API batch, from the API's record of it and its job's batch.json.

Pure: the caller reads the files (and says which output files are there); nothing here touches disk.
"""

from __future__ import annotations

from typing import Any

STATUS_MAP = {"queued": "validating"}  # our other statuses are OpenAI's own
ENDED = ("completed", "failed", "cancelled", "expired")
NOTHING_YET = {"total": 0, "completed": 0, "failed": 0}


def to_openai_batch(
    record: dict[str, Any],
    batch: dict[str, Any] | None,
    *,
    has_output: bool = False,
    has_errors: bool = False,
) -> dict[str, Any]:
    """`record` is the API's (id, model, endpoint, input file, window, created_at, metadata,
    cancel_requested); `batch` the job's batch.json, None before the daemon took the drop.
    `has_output`/`has_errors`: the model's `.jsonl`/`.errors.jsonl` is in the outbox."""
    b = batch or {}
    model = record["model"]
    m = b.get("models", {}).get(model)
    if batch is not None and m is None:  # rejected before the models ran
        status, counts = b["status"], b["request_counts"]
    elif m is not None:
        status, counts = m["status"], m["request_counts"]
    else:
        status, counts = "queued", dict(NOTHING_YET)
    if record.get("cancel_requested") and status not in ENDED:
        status = "cancelling"
    done_at = (m or {}).get("completed_at") or b.get("failed_at")
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": STATUS_MAP.get(status, status),
        "created_at": record["created_at"],
        "in_progress_at": b.get("in_progress_at"),
        "completed_at": done_at if status == "completed" else None,
        "failed_at": done_at if status == "failed" else None,
        "cancelled_at": done_at if status == "cancelled" else None,
        "finalizing_at": None,
        "expires_at": b.get("expires_at"),
        "expired_at": b.get("expired_at") if status == "expired" else None,
        "cancelling_at": None,
        "output_file_id": f"file-out-{record['id']}" if has_output else None,
        "error_file_id": f"file-err-{record['id']}" if has_errors else None,
        "request_counts": counts,
        "usage": batch_usage((m or {}).get("usage") or {}),
        "metadata": record["metadata"],
        "errors": batch_errors(b.get("errors")) if status == "failed" else None,
        "model": model,
    }


def batch_usage(used: dict[str, Any]) -> dict[str, Any]:
    """A model's usage in batch.json (chat's names) as the batch object's."""
    prompt, completion = used.get("prompt_tokens", 0), used.get("completion_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": used.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def batch_errors(errors: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's `errors` in batch.json (job-level: a rejected file, an internal error, line errors) as OpenAI's."""
    if not errors:
        return None
    return {
        "object": "list",
        "data": [
            {"code": e.get("code"), "message": e.get("message"), "line": e.get("line"), "param": None}
            for e in errors["data"]
        ],
    }
