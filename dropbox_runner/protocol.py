"""The pipe between the daemon and a model process: typed commands and events, one JSON line each.

Commands go down the model process's stdin; events come up an inherited pipe. Both sides encode
and decode here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import orjson


class ProtocolError(ValueError):
    """A line on the pipe that is not a known message."""


@dataclass(slots=True)
class Message:
    tag: ClassVar[str] = ""  # the class name in snake case: LoadFailed -> load_failed

    def __init_subclass__(cls) -> None:  # no super(): slots=True makes a new class
        cls.tag = re.sub(r"(?<!^)([A-Z])", r"_\1", cls.__name__).lower()

    def encode(self) -> bytes:
        return orjson.dumps({"m": self.tag, **{f.name: getattr(self, f.name) for f in fields(self)}}) + b"\n"


# -- commands: daemon -> model process ---------------------------------------------------------------
@dataclass(slots=True)
class Start(Message):
    """The first line: which model to load and where to send events."""

    event_fd: int
    model: str
    engine: str
    task: str
    path: str | None
    engine_args: dict[str, Any]
    build: str | None = None  # a packaged model to build into `path` before loading (first use)
    feed_order: str = "prefix"  # prefix: windows fed grouped by prompt prefix; input: in input order
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters it answers for: name -> folder


@dataclass(slots=True)
class TaskOrder:
    job_id: str
    model: str
    input: str
    log: str
    total: int
    defaults: list[dict[str, Any]]
    commit_interval_ms: int
    request_timeout_seconds: float | None = None
    poison: list[int] = field(default_factory=list)
    trials: list[list[int]] = field(default_factory=list)  # a culprit hunt's parts, run alone in turn
    shard: list[int] | None = None  # [start, end): run only these lines and send results back (copies)
    shard_at: list[int] | None = None  # offset, physical line and index of a line at or before the start
    shard_done: list[int] = field(default_factory=list)  # lines of the shard with a result already: skipped
    task_id: str = ""  # names the task in every event about it (several tasks share one process)
    priority: int = 0
    group: str = ""  # the fair-share group (section 12): tasks of one group share its turn

    def __post_init__(self) -> None:
        self.task_id = self.task_id or f"{self.job_id}/{self.model}"


@dataclass(slots=True)
class Run(Message):
    """Run one task; the model process answers with events, then TaskDone."""

    task: TaskOrder

    def encode(self) -> bytes:
        return orjson.dumps({"m": self.tag, "task": self.task}) + b"\n"


@dataclass(slots=True)
class Cancel(Message):
    """Abort the task's requests in flight; it ends cancelled. No task id: every task."""

    task_id: str = ""


@dataclass(slots=True)
class Stop(Message):
    """Commit and exit (a swap, or the daemon stopping); with a task id, only that task ends
    (interrupted: it gave up its slot) and the process goes on with the others. `grace_seconds`:
    how long the requests in flight may go on before the rest is aborted."""

    task_id: str = ""
    grace_seconds: float = 0.0


# -- events: model process -> daemon -----------------------------------------------------------------
@dataclass(slots=True)
class Loaded(Message):
    """The model is ready; `capacity` requests may be in flight."""

    load_seconds: float
    capacity: int


@dataclass(slots=True)
class LoadFailed(Message):
    """The model could not load; `reason` is its error in one sentence."""

    reason: str


@dataclass(slots=True)
class Resumed(Message):
    """The task's log was recovered: `kept` results were already committed."""

    kept: int
    notes: list[str]
    task_id: str = ""


@dataclass(slots=True)
class Running(Message):
    """A part of a culprit hunt about to run alone: the task's lines `index` to `last` without a
    result (nothing else runs until they end); `index` None once the hunt is over."""

    index: int | None
    task_id: str = ""
    last: int | None = None


@dataclass(slots=True)
class Progress(Message):
    """The committed marker; sent after commits, dropped when the pipe is full (the next one says more)."""

    count: int
    failed: int
    completion_tokens: int
    started_at: float | None
    updated_at: float | None
    task_id: str = ""
    engine_preemptions: int | None = None  # the engine's own since it loaded, for the whole process


@dataclass(slots=True)
class Results(Message):
    """A copy's results for the daemon to append: [index, ok, prompt, completion, cached, payload]."""

    records: list[list[Any]]
    task_id: str = ""


@dataclass(slots=True)
class IoError(Message):
    """A commit failed (disk full, I/O error): the model process stops right after."""

    message: str
    task_id: str = ""


@dataclass(slots=True)
class TaskDone(Message):
    """The task ended: completed, cancelled, or interrupted (the daemon is stopping)."""

    # completed | cancelled | interrupted | failed (the engine refused the task's adapter) | crashed
    # (copies of its model died too often with its shards: said only by `copies.pool` to the slot)
    outcome: str
    task_id: str = ""
    error: str | None = None  # why it failed


COMMANDS: dict[str, type[Message]] = {c.tag: c for c in (Start, Run, Cancel, Stop)}
EVENTS: dict[str, type[Message]] = {
    c.tag: c for c in (Loaded, LoadFailed, Resumed, Running, Progress, Results, IoError, TaskDone)
}


def decode(line: bytes, table: dict[str, type[Message]]) -> Message:
    try:
        obj = orjson.loads(line)
        cls = table[obj.pop("m")]
        if cls is Run:
            return Run(TaskOrder(**obj["task"]))
        return cls(**obj)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"not a message: {line[:200]!r}") from exc
