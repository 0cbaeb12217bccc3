"""The queue journal: immutable job specs, one record per (job, model) task, and queue entries.

A job is a folder `state/jobs/<id>/`; a finished one moves whole to `state/archive/<id>/`. Queue
entries in `state/queue/` are named so that lexical order is queue order (priority, then arrival).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from dropbox_runner.errors import JobNotFound
from dropbox_runner.fsutil import fsync_dir, read_json, write_json
from dropbox_runner.layout import Layout
from dropbox_runner.queue import catalog
from dropbox_runner.queue.keys import BadQueueKey, QueueKey
from dropbox_runner.queue.lifecycle import Status, transition


class JobSpec(BaseModel):
    """Written once when a drop is taken; never changed."""

    id: str
    name: str  # the drop's file name without .jsonl
    outbox: str  # folder name under outbox/ (name, or name.2, ...)
    source: str  # where the drop came from, relative to the inbox
    models: list[str]
    priority: int = 0
    created_at: float
    sha256: str = ""
    total: int = 0  # non-blank lines
    valid: int = 0
    defaults: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    rejected: list[str] = Field(default_factory=list)  # reasons the whole file was rejected
    line_errors: list[dict[str, Any]] = Field(default_factory=list)  # first bad lines, for batch.json
    dedupe_of: str | None = None
    fingerprints: dict[str, str] = Field(default_factory=dict)  # each model's entry, for dedupe
    completion_window: str | None = None  # as given; the job expires at expires_at
    expires_at: float | None = None
    output_expires_seconds: int | None = None  # output_expires_after: removed this long after finishing


class TaskRecord(BaseModel):
    """The mutable state of one model's run of a job."""

    job_id: str
    model: str
    status: Status = Status.QUEUED
    queue_key: str
    in_progress_at: float | None = None
    completed_at: float | None = None
    load_seconds: float | None = None
    error: str | None = None
    error_code: str | None = None  # the code of the failure lines `error` explains (internal_error, ...)
    crashes: int = 0
    poison: list[int] = Field(default_factory=list)
    suspect_until: int = -1  # lines up to this one were fed when the model process last crashed
    hunt: list[int] = Field(default_factory=list)  # [first, last]: lines halved, alone, to find a culprit
    narrowings: int = 0  # crashes that narrowed the hunt (they found part of the culprit: not given up for)
    retries: int = 0
    group: str | None = None  # its fair-share group, set when it first runs (section 12)
    preemptions: int = 0  # times the task gave up its slot (a higher priority, another group or model)
    outcome: Status | None = None  # the final status publishing is for (kept across a crash)
    ending: Status | None = None  # cancelled or expired, once asked while it ran: the first one asked

    def move(self, status: Status) -> None:
        self.status = status

    def __setattr__(self, name: str, value: Any) -> None:
        """Every change of `status` goes through the transition table; an illegal one raises
        BadTransition (reading a record from disk does not pass here)."""
        if name == "status":
            value = transition(self.status, Status(value))
        super().__setattr__(name, value)


def new_job_id() -> str:
    return f"batch_{time.time_ns():x}{secrets.token_hex(3)}"


def queue_key(priority: int, created_ns: int, job_id: str, model: str) -> str:
    return str(QueueKey.of(priority, created_ns, job_id, model))


class Journal:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    # -- jobs ---------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.layout.job_dir(job_id)

    def input_path(self, job_id: str) -> Path:
        return self.layout.job(job_id).input

    def log_path(self, job_id: str, model: str) -> Path:
        return self.layout.job(job_id).log(model)

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.model_validate(read_json(self.layout.job(job_id).spec))

    def create(self, spec: JobSpec) -> list[TaskRecord]:
        """Write the spec and every task record, then the queue entries: the job is queued."""
        self.make_dir(spec.id)
        self.save_spec(spec)
        created_ns = int(spec.created_at * 1e9)
        tasks = [
            TaskRecord(
                job_id=spec.id, model=m, queue_key=queue_key(spec.priority, created_ns + i, spec.id, m)
            )
            for i, m in enumerate(spec.models)
        ]
        for t in tasks:
            self.save_task(t)
        for t in tasks:
            self.enqueue(t)
        return tasks

    def make_dir(self, job_id: str) -> Path:
        d = self.layout.active_job(job_id).path
        if not d.is_dir():
            d.mkdir()
            fsync_dir(self.layout.jobs)
        return d

    def save_spec(self, spec: JobSpec) -> None:
        write_json(self.layout.job(spec.id).spec, spec.model_dump())

    def find(self, ref: str) -> JobSpec:
        """A job by id, by outbox folder name or by drop name (the newest of that name)."""
        job_id = catalog.find_job(self.layout, ref)
        if job_id is None:
            raise JobNotFound(f"no job is named {ref!r}; `dropbox-runner status` lists them.")
        return self.spec(job_id)

    def archive(self, job_id: str) -> None:
        self._move(self.layout.active_job(job_id).path, self.layout.archived_job(job_id).path)

    def unarchive(self, job_id: str) -> None:
        self._move(self.layout.archived_job(job_id).path, self.layout.active_job(job_id).path)

    @staticmethod
    def _move(src: Path, dst: Path) -> None:
        if src.exists():
            os.replace(src, dst)
            fsync_dir(src.parent)
            fsync_dir(dst.parent)

    def forget(self, job_id: str) -> None:
        shutil.rmtree(self.layout.active_job(job_id).path, ignore_errors=True)

    # -- tasks --------------------------------------------------------------------------------------
    def task_path(self, job_id: str, model: str) -> Path:
        return self.layout.job(job_id).task(model)

    def task(self, job_id: str, model: str) -> TaskRecord:
        return TaskRecord.model_validate(read_json(self.task_path(job_id, model)))

    def tasks(self, spec: JobSpec) -> list[TaskRecord]:
        return [self.task(spec.id, m) for m in spec.models]

    def save_task(self, task: TaskRecord) -> None:
        write_json(self.task_path(task.job_id, task.model), task.model_dump(mode="json"))

    # -- queue entries: only these methods write or remove them -----------------------------------
    def enqueue(self, task: TaskRecord) -> None:
        write_json(self.layout.queue_entry(task.queue_key), {"job_id": task.job_id, "model": task.model})

    def dequeue(self, task: TaskRecord) -> None:
        self.dequeue_key(task.queue_key)

    def dequeue_key(self, key: str) -> None:
        """Remove one queue entry (gone already: nothing to do)."""
        try:
            self.layout.queue_entry(key).unlink()
            fsync_dir(self.layout.queue)
        except FileNotFoundError:
            pass

    def dequeue_job(self, job_id: str) -> None:
        """Remove every queue entry of a job (one set aside in quarantine)."""
        for key, queued_job, _ in self.queued():
            if queued_job == job_id:
                self.dequeue_key(key)

    def dequeue_if_stale(self, key: str, job_id: str, model: str) -> bool:
        """Remove an entry whose task record is gone from the active jobs; True if it was."""
        if self.layout.active_job(job_id).task(model).exists():
            return False
        self.dequeue_key(key)
        return True

    def queued(self) -> list[tuple[str, str, str]]:
        """(queue key, job id, model) of every queue entry, in queue order; names that are no
        queue key (a stray file) are not entries."""
        out = []
        for key in sorted(os.listdir(self.layout.queue)):
            if key.startswith("."):
                continue
            try:
                QueueKey.parse(key)
                entry = read_json(self.layout.queue_entry(key))
            except (FileNotFoundError, BadQueueKey, ValueError):
                continue
            out.append((key, entry["job_id"], entry["model"]))
        return out
