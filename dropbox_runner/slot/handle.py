"""What the slot holds for its loaded model, whether one process or several copies: the one interface
`execution.Execution` drives (`supervisor.ModelProcess` and `copies.pool.Copies` both have it).

Commands: `send(Run(order))` adds a task, `send(Cancel(task))` cancels it, `send(Stop(task))` takes
its slot back, `send(Stop(grace_seconds=...))` stops every task (a preemption, the daemon stopping).
Events, from `events(timeout)` (the pump): Loaded, LoadFailed, Resumed, Progress (the committed
marker), Running, IoError, TaskDone. `trouble` says when the whole handle must be treated as dead;
`describe` is its part of the status snapshot.
"""

from __future__ import annotations

from typing import Any, Protocol

from dropbox_runner import protocol as p


class ModelHandle(Protocol):
    name: str
    started_at: float
    trials: dict[str, list[int]]  # task id -> the part of its culprit hunt running alone

    @property
    def loaded(self) -> bool: ...

    @property
    def pid(self) -> int: ...

    @property
    def load_seconds(self) -> float | None: ...

    def alive(self) -> bool: ...

    def send(self, command: p.Message) -> bool: ...

    def events(self, timeout: float) -> list[p.Message]: ...

    def trouble(self, settings: Any, busy: bool) -> str | None: ...

    def drain(self) -> list[p.Message]: ...

    def end(self, timeout: float) -> float: ...

    def describe(self) -> dict[str, Any]: ...
