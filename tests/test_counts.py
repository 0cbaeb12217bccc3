"""queue.counts: the one arithmetic of a task's counts and rates, and the status a job shows, that
batch.json and `status` both report (issue 21 item 4). Pure, so tested directly."""

from __future__ import annotations

from dropbox_runner.queue.counts import shown_job_status, shown_status, task_counts
from dropbox_runner.queue.journal import JobSpec, TaskRecord
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.results.batchfile import model_entry
from dropbox_runner.results.log import Marker
from dropbox_runner.status.view import model_row

MARKER = {
    "count": 40,
    "failed": 3,
    "prompt_tokens": 400,
    "completion_tokens": 800,
    "cached_tokens": 64,
    "started_at": 1000.0,
    "updated_at": 1020.0,
}


def test_a_running_task_s_rates_and_eta_come_from_its_marker() -> None:
    counts = task_counts(100, "in_progress", None, MARKER, now=1030.0)
    assert counts["done"] == 40 and counts["succeeded"] == 37 and counts["failed"] == 3
    assert counts["tokens_per_second"] == 40.0, "800 tokens in the 20 s up to the last commit"
    assert counts["eta_seconds"] == 30.0, "60 lines left at 2 lines a second"
    assert counts["checkpoint_age_seconds"] == 10.0
    assert counts["usage"] == {"prompt_tokens": 400, "completion_tokens": 800, "cached_tokens": 64}


def test_a_finished_task_counts_its_unanswered_lines_as_failed_and_has_no_eta() -> None:
    counts = task_counts(100, "cancelled", 1040.0, MARKER, now=5000.0)
    assert counts["failed"] == 3 + 60 and counts["succeeded"] == 37
    assert counts["eta_seconds"] is None
    assert counts["tokens_per_second"] == 20.0, "a finished task's rate runs to its completed_at, not now"


def test_a_queued_or_unstarted_task_has_no_eta_and_no_rate() -> None:
    assert task_counts(100, "queued", None, MARKER, now=1030.0)["eta_seconds"] is None
    fresh = task_counts(100, "in_progress", None, None, now=1030.0)
    assert fresh["done"] == 0 and fresh["tokens_per_second"] == 0.0 and fresh["eta_seconds"] is None
    assert fresh["checkpoint_age_seconds"] is None and fresh["failed"] == 0


def test_a_preempted_task_keeps_its_job_in_progress_and_a_rejected_job_is_failed() -> None:
    assert shown_status("queued", 1) == Status.IN_PROGRESS
    assert shown_status("queued", 0) == Status.QUEUED
    assert shown_job_status(False, [("queued", 2), ("queued", 0)]) == Status.IN_PROGRESS
    assert shown_job_status(False, [("queued", 0), ("queued", None)]) == Status.QUEUED
    assert shown_job_status(False, [("completed", 0), ("failed", 0)]) == Status.COMPLETED
    assert shown_job_status(True, []) == Status.FAILED


def test_batch_json_and_status_report_the_same_counts() -> None:
    spec = JobSpec(
        id="batch_1", name="n", outbox="n", source="n.jsonl", models=["m"], created_at=990.0, total=100
    )
    for status, completed_at in ((Status.IN_PROGRESS, None), (Status.COMPLETED, 1040.0)):
        task = TaskRecord(
            job_id="batch_1", model="m", queue_key="k", status=status, completed_at=completed_at
        )
        entry = model_entry(spec, task, Marker(**MARKER))
        row = model_row(spec.model_dump(), task.model_dump(mode="json"), MARKER, now=1030.0)
        assert entry["request_counts"] == {
            "total": 100,
            "completed": row["succeeded"],
            "failed": row["failed"],
        }
        assert entry["tokens_per_second"] == row["tokens_per_second"]
        assert entry["usage"]["prompt_tokens"] == row["usage"]["prompt_tokens"] == 400
        assert entry["usage"]["completion_tokens"] == row["usage"]["completion_tokens"] == 800
        assert entry["usage"]["input_tokens_details"]["cached_tokens"] == row["usage"]["cached_tokens"] == 64
