"""Which task runs next: priority, then arrival, but the loaded model's work first within a bound;
and, while a model process runs, which queued task joins it, which gives its slot back, and when
another model preempts it.

Preferring the loaded model saves model swaps; no task waits more than `max_swap_delay_seconds`
behind later work because of it. A LoRA adapter's task is its base's work: `base_of` maps it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from dropbox_runner.queue.keys import QueueKey


@dataclass(frozen=True)
class Choice:
    key: str
    job_id: str
    model: str
    reason: str


def queued_at(key: str) -> float:
    """Arrival time encoded in a queue key (`<rank>-<created_ns>-...`)."""
    return QueueKey.parse(key).queued_at


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
    top = rank(head[0])
    for entry in entries[1:]:
        if rank(entry[0]) != top:
            break
        if base_of(entry[2]) == loaded:
            return Choice(
                *entry, reason=f"{loaded} is loaded; {head[1]}/{head[2]} waits ({waited:.0f}s so far)"
            )
    return Choice(*head, reason=f"no queued work for {loaded}")


def model_of(held: Held) -> str:
    """The model of a held task, from its id (`<job id>/<model>`)."""
    return held.task_id.rsplit("/", 1)[-1]


def rank(key: str) -> int:
    """The priority part of a queue key: lower is served first."""
    return QueueKey.parse(key).rank


@dataclass(frozen=True)
class Held:
    """A task the model process holds, as admission sees it."""

    key: str  # its queue key
    task_id: str
    group: str
    leaving: bool = False


@dataclass(frozen=True)
class Admission:
    admit: Choice | None = None
    evict: str | None = None  # the task id that gives up its slot
    preempt: str | None = None  # why the model process stops for another model
    reason: str = ""


def admission(
    queued: list[tuple[str, str, str]],
    held: list[Held],
    loaded: str,
    groups: dict[str, str],
    *,
    max_shared: int,
    max_delay: float,
    preempt_after: float | None,
    loaded_for: float,
    runnable: set[str],
    back_since: dict[str, float] | None = None,
    now: float | None = None,
    base_of: Callable[[str], str] = str,
) -> Admission:
    """What the loaded process does next with the queue (CONTRACT section 12): preempt for another
    model, admit a task of its own model, take a slot back from one, or nothing.

    `queued` excludes the held tasks; `groups` gives the group of each queued key; `back_since`, when
    a task that gave up its slot went back to the queue: its wait counts from then, so two models do
    not preempt each other in turn.
    """
    now = time.time() if now is None else now
    top = min(rank(h.key) for h in held)
    for key, job_id, model in queued:
        if base_of(model) == loaded or model not in runnable or rank(key) > top:
            continue
        waited = now - max(queued_at(key), (back_since or {}).get(key, 0.0))
        higher = rank(key) < top
        if not higher and waited < max_delay:
            continue
        why = (
            "a higher priority than every running task"
            if higher
            else f"waited {waited:.0f}s, the most allowed"
        )
        if preempt_after is not None and loaded_for >= preempt_after:
            reason = f"{job_id}/{model} has {why}; {loaded} was loaded {loaded_for:.0f}s ago"
            return Admission(admit=Choice(key, job_id, model, reason=reason), preempt=reason)
        if waited >= max_delay:
            return Admission(reason=f"{job_id}/{model} has waited {waited:.0f}s: {loaded} takes no new task")
        break
    mine = [e for e in queued if base_of(e[2]) == loaded]  # an adapter's task is its base's work
    if not mine:
        return Admission()
    running_in = Counter(h.group for h in held if not h.leaving)
    mine.sort(key=lambda e: (rank(e[0]), running_in[groups.get(e[0], "")] > 0))
    best = mine[0]
    adapter = base_of(best[2]) != best[2]
    if any((base_of(model_of(h)) != model_of(h)) != adapter for h in held):
        # The base's own lines never share the engine with its adapters' lines: vLLM's CPU build gave
        # base requests an adapter's weights when both were in one step (docs/lora.md). The task
        # waits for the running ones to end and then runs in the same process, without a reload.
        return Admission(reason=f"{best[1]}/{best[2]} waits: base and adapters take turns")
    if len(held) < max_shared:
        n = len(held) + 1
        return Admission(
            admit=Choice(*best, reason=f"joins the running {loaded} ({n} of {max_shared} slots)")
        )
    if any(h.leaving for h in held):
        return Admission()  # a slot is being given back
    lowest = max(held, key=lambda h: (rank(h.key), h.key))
    if rank(best[0]) < rank(lowest.key):
        why = f"{best[1]}/{best[2]} has a higher priority than {lowest.task_id}, the lowest running"
        return Admission(evict=lowest.task_id, reason=why)
    group = groups.get(best[0], "")
    fullest, count = max(running_in.items(), key=lambda kv: (kv[1], kv[0]), default=("", 0))
    if running_in[group] == 0 and count >= 2:
        equal = [h for h in held if h.group == fullest and rank(h.key) >= rank(best[0])]
        if not equal:
            return Admission()
        victim = max(equal, key=lambda h: (rank(h.key), h.key))
        why = f"group {group} has no running task and group {fullest} holds {count}"
        return Admission(evict=victim.task_id, reason=why)
    return Admission()
