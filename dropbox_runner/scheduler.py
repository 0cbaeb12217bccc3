"""Which task runs next: priority, then arrival, but the loaded model's work first within a bound.

Preferring the loaded model saves model swaps; no task waits more than `max_swap_delay_seconds`
behind later work because of it. A LoRA adapter's task is its base's work: `base_of` maps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    key: str
    job_id: str
    model: str
    reason: str


def queued_at(key: str) -> float:
    """Arrival time encoded in a queue key (`<rank>-<created_ns>-...`)."""
    return int(key.split("-", 2)[1]) / 1e9


def pick(
    entries: list[tuple[str, str, str]],
    loaded: str | None,
    max_delay: float,
    now: float | None = None,
    base_of: Callable[[str], str] = str,
) -> Choice | None:
    if not entries:
        return None
    now = time.time() if now is None else now
    head = entries[0]
    if loaded is None or base_of(head[2]) == loaded:
        return Choice(*head, reason="first in line")
    waited = now - queued_at(head[0])
    if waited >= max_delay:
        return Choice(*head, reason=f"{head[1]}/{head[2]} has waited {waited:.0f}s, the most allowed")
    rank = head[0].split("-", 1)[0]
    for entry in entries[1:]:
        if entry[0].split("-", 1)[0] != rank:
            break
        if base_of(entry[2]) == loaded:
            return Choice(
                *entry, reason=f"{loaded} is loaded; {head[1]}/{head[2]} waits ({waited:.0f}s so far)"
            )
    return Choice(*head, reason=f"no queued work for {loaded}")
