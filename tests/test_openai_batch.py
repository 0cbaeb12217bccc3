"""`to_openai_batch` on its own: the API's record and the job's batch.json in, OpenAI's batch object
out (checked against the official client's own `Batch` type), with no server, daemon or disk."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from openai.types import Batch

from dropbox_runner.api.openai_batch import to_openai_batch
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.results.batchfile import usage_block

RECORD = {
    "id": "batch_a",
    "model": "echo",
    "outbox": "batch_a",
    "input_file_id": "file-in",
    "endpoint": "/v1/chat/completions",
    "completion_window": "24h",
    "created_at": 1000,
    "metadata": {"team": "x"},
}


def model_entry(status: str, completed_at: int | None = None, **counts: int) -> dict[str, Any]:
    """A model of batch.json as results/batchfile writes it (the fields the batch object reads)."""
    return {
        "status": status,
        "request_counts": {"total": 4, "completed": 0, "failed": 0, **counts},
        "usage": usage_block(prompt=30, completion=12, cached=8),
        "completed_at": completed_at,
    }


def batch_json(status: str, models: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "id": "job-1",
        "status": status,
        "output_folder": "batch_a",
        "in_progress_at": 1010,
        "expires_at": 87400,
        "failed_at": None,
        "expired_at": None,
        "request_counts": {"total": 4, "completed": 0, "failed": 0},
        "models": models,
        "errors": None,
        **fields,
    }


def openai(record: dict[str, Any], batch: dict[str, Any] | None, **files: bool) -> dict[str, Any]:
    """The object, after the official client's type has read it back unchanged."""
    obj = to_openai_batch(record, batch, **files)
    Batch.model_validate(obj)
    return obj


def test_before_the_daemon_takes_the_drop_the_batch_is_validating_with_nothing_counted() -> None:
    obj = openai(RECORD, None)
    assert obj["status"] == "validating" and obj["object"] == "batch" and obj["model"] == "echo"
    assert obj["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert obj["usage"]["total_tokens"] == 0 and obj["usage"]["input_tokens_details"] == {"cached_tokens": 0}
    times = ("in_progress_at", "completed_at", "failed_at", "cancelled_at", "expires_at", "expired_at")
    assert all(obj[t] is None for t in times)
    assert obj["output_file_id"] is None and obj["error_file_id"] is None and obj["errors"] is None
    assert {k: obj[k] for k in ("id", "endpoint", "input_file_id", "completion_window", "created_at")} == {
        k: RECORD[k] for k in ("id", "endpoint", "input_file_id", "completion_window", "created_at")
    }
    assert obj["metadata"] == {"team": "x"}


def test_a_queued_model_is_validating_and_a_running_one_in_progress() -> None:
    assert openai(RECORD, batch_json("queued", {"echo": model_entry("queued")}))["status"] == "validating"
    running = openai(RECORD, batch_json("in_progress", {"echo": model_entry("in_progress", completed=2)}))
    assert running["status"] == "in_progress" and running["in_progress_at"] == 1010
    assert running["request_counts"] == {"total": 4, "completed": 2, "failed": 0}
    assert running["completed_at"] is None and running["expires_at"] == 87400


def test_a_completed_batch_has_its_time_usage_and_the_files_that_are_there() -> None:
    batch = batch_json("completed", {"echo": model_entry("completed", 1500, completed=3, failed=1)})
    obj = openai(RECORD, batch, has_output=True, has_errors=True)
    assert obj["status"] == "completed" and obj["completed_at"] == 1500
    assert obj["failed_at"] is None and obj["cancelled_at"] is None and obj["expired_at"] is None
    assert obj["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert obj["usage"] == {
        "input_tokens": 30,
        "input_tokens_details": {"cached_tokens": 8},
        "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 42,
    }
    assert obj["output_file_id"] == "file-out-batch_a" and obj["error_file_id"] == "file-err-batch_a"
    alone = openai(RECORD, batch, has_output=True)
    assert alone["output_file_id"] == "file-out-batch_a" and alone["error_file_id"] is None


def test_each_linked_batch_reads_its_own_model_of_the_job() -> None:
    batch = batch_json(
        "in_progress",
        {
            "echo": model_entry("completed", 1500, completed=4),
            "other": model_entry("in_progress", completed=1),
        },
    )
    other = {**RECORD, "id": "batch_b", "model": "other"}
    assert openai(RECORD, batch)["status"] == "completed"
    assert openai(RECORD, batch)["request_counts"]["completed"] == 4
    assert openai(other, batch)["status"] == "in_progress" and openai(other, batch)["completed_at"] is None
    assert (
        openai(other, batch)["request_counts"]["completed"] == 1 and openai(other, batch)["model"] == "other"
    )


def test_a_cancel_asked_for_shows_cancelling_until_the_model_ends() -> None:
    asked = {**RECORD, "cancel_requested": True}
    assert openai(asked, None)["status"] == "cancelling"
    assert (
        openai(asked, batch_json("in_progress", {"echo": model_entry("in_progress")}))["status"]
        == "cancelling"
    )
    cancelled = openai(asked, batch_json("cancelled", {"echo": model_entry("cancelled", 1200)}))
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] == 1200
    done = openai(asked, batch_json("completed", {"echo": model_entry("completed", 1300)}))
    assert done["status"] == "completed", "a cancel that came too late changes nothing"


def test_a_rejected_drop_is_failed_with_the_job_s_counts_time_and_errors() -> None:
    errors = {"object": "list", "data": [{"code": "invalid_file", "message": "not JSONL", "line": None}]}
    counts = {"total": 3, "completed": 0, "failed": 3}
    batch = batch_json("failed", {}, failed_at=1100, request_counts=counts, errors=errors)
    obj = openai(RECORD, batch)
    assert obj["status"] == "failed" and obj["failed_at"] == 1100 and obj["completed_at"] is None
    assert obj["request_counts"] == counts
    assert obj["errors"] == {
        "object": "list",
        "data": [{"code": "invalid_file", "message": "not JSONL", "line": None, "param": None}],
    }


def test_errors_are_given_only_when_the_batch_failed() -> None:
    errors = {
        "object": "list",
        "data": [{"code": "invalid_request", "message": "line 2: no body", "line": 2}],
    }
    batch = batch_json("completed", {"echo": model_entry("completed", 1500)}, errors=errors)
    assert openai(RECORD, batch)["errors"] is None
    failed = batch_json("failed", {"echo": model_entry("failed", 1500)}, errors=errors)
    assert openai(RECORD, failed)["errors"]["data"][0]["line"] == 2
    assert openai(RECORD, batch_json("failed", {"echo": model_entry("failed", 1500)}))["errors"] is None


def test_an_expired_batch_has_its_expiry_time() -> None:
    obj = openai(RECORD, batch_json("expired", {"echo": model_entry("expired", 90000)}, expired_at=90000))
    assert obj["status"] == "expired" and obj["expired_at"] == 90000 and obj["completed_at"] is None


@pytest.mark.parametrize("status", [s.value for s in Status])
@pytest.mark.parametrize("cancel_requested", [False, True])
def test_every_status_of_ours_is_one_openai_s_batch_type_takes(status: str, cancel_requested: bool) -> None:
    record = {**RECORD, "cancel_requested": cancel_requested}
    obj = openai(record, batch_json(status, {"echo": model_entry(status, 1500)}))
    ended = Status(status).final
    expected = (
        "cancelling" if cancel_requested and not ended else {"queued": "validating"}.get(status, status)
    )
    assert obj["status"] == expected


def test_the_inputs_are_left_as_they_were() -> None:
    record = {**RECORD, "cancel_requested": True}
    batch = batch_json("failed", {}, failed_at=1100, errors={"object": "list", "data": [{"code": "x"}]})
    before = copy.deepcopy((record, batch))
    to_openai_batch(record, batch, has_output=True)
    assert (record, batch) == before
