"""One task held by the model slot: its records, its group, the order it is sent with, its rate over
the last minute, and the throttles of what it writes (batch.json, progress lines in the log).
"""

from __future__ import annotations

import os
import pwd
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from dropbox_runner import protocol as p
from dropbox_runner.config import Registry
from dropbox_runner.queue.journal import JobSpec, Journal, TaskRecord
from dropbox_runner.queue.lifecycle import Status
from dropbox_runner.slot import adapters

RATE_WINDOW_SECONDS = 60.0
BATCH_JSON_SECONDS = 2.0
PROGRESS_LOG_SECONDS = 10.0
GROUP_BYTES = 64
API_GROUP = "api"


def group_of(journal: Journal, spec: JobSpec, key: str) -> str:
    """A job's fair-share group: its metadata's `key` (strings as they are, other values as compact
    JSON, cut to 64 bytes); else `api` for a job sent through the API; else the dropped file's owner."""
    if key in spec.metadata:
        value = spec.metadata[key]
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        return text.encode()[:GROUP_BYTES].decode(errors="ignore")
    if "api_batches" in spec.metadata:
        return API_GROUP
    try:
        uid = os.stat(journal.input_path(spec.id)).st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "unknown"


@dataclass
class SlotTask:
    task: TaskRecord
    spec: JobSpec
    group: str
    sent: bool = False  # handed to the model process
    cancel_outcome: Status = Status.CANCELLED  # or EXPIRED, when its completion window ran out
    cancelling: bool = False  # a cancel (or expiry) was sent: it ends so whatever else it says
    leaving: str | None = None  # why it gives up its slot; back to the queue when it has committed
    counted: tuple[int, int] = (0, 0)  # requests and completion tokens already in history
    done: int = 0
    samples: deque = field(default_factory=deque)  # (time, requests, completion tokens), last minute
    unwritten: bool = False  # progress came that batch.json does not show yet
    _last_batch_json: float = 0.0
    _last_progress_log: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.task.job_id}/{self.task.model}"

    def order(self, journal: Journal, registry: Registry, trials: list[list[int]]) -> p.TaskOrder:
        """What the model process (or the copies) is sent to run this task; `trials`: the parts of
        its culprit hunt to run alone in turn (slot.failures.hunt_parts)."""
        task, spec, settings = self.task, self.spec, registry.settings
        model = adapters.effective_config(registry, task.model)
        return p.TaskOrder(
            job_id=spec.id,
            model=task.model,
            input=str(journal.input_path(spec.id)),
            log=str(journal.log_path(spec.id, task.model)),
            total=spec.total,
            defaults=[spec.defaults, model.defaults],
            commit_interval_ms=settings.commit_interval_ms,
            request_timeout_seconds=registry.request_timeout_seconds(task.model),
            poison=task.poison,
            trials=trials,
            task_id=self.key,
            priority=spec.priority,
            group=self.group,
        )

    def progressed(self, ev: p.Progress) -> None:
        now = time.monotonic()
        self.counted, self.done = (ev.count, ev.completion_tokens), ev.count
        self.samples.append((now, ev.count, ev.completion_tokens))
        while len(self.samples) > 2 and now - self.samples[1][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()

    def recent_rate(self) -> tuple[float, float]:
        """Requests and completion tokens per second over the last minute (0 without two samples)."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, r0, c0), (t1, r1, c1) = self.samples[0], self.samples[-1]
        span = t1 - t0
        return ((r1 - r0) / span, (c1 - c0) / span) if span > 0 else (0.0, 0.0)

    def due_batch_json(self) -> bool:
        return self._due("_last_batch_json", BATCH_JSON_SECONDS)

    def due_progress_log(self) -> bool:
        return self._due("_last_progress_log", PROGRESS_LOG_SECONDS)

    def _due(self, attr: str, every: float) -> bool:
        now = time.monotonic()
        if now - getattr(self, attr) < every:
            return False
        setattr(self, attr, now)
        return True

    def describe(self, all_running: Iterable[SlotTask]) -> dict[str, Any]:
        """For status: group, share of the model's completion tokens over the last minute, ETA."""
        requests_rate, tokens_rate = self.recent_rate()
        total_rate = sum(r.recent_rate()[1] for r in all_running)
        left = max(0, self.spec.total - self.done)
        return {
            "job_id": self.task.job_id,
            "model": self.task.model,
            "group": self.group,
            "priority": self.spec.priority,
            "share": round(tokens_rate / total_rate, 3) if total_rate > 0 else None,
            "eta_seconds": round(left / requests_rate, 1) if requests_rate > 0 else None,
            "preemptions": self.task.preemptions,
            "leaving": self.leaving,
        }
