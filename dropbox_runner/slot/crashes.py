"""What to do when a model process or a copy dies or hangs: plain decisions over a task record,
over the tasks a shared process held, and over a copy's shard.

Most crashes are not the request's fault (a kill, a passing OOM), so a first crash restarts at full
speed. A second crash before every line fed at the first has a result runs those lines one at a
time; a crash while one line runs alone fails that line by itself (`engine_crash`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dropbox_runner.queue.journal import TaskRecord

MAX_CRASHES_WITHOUT_CULPRIT = 5
MEMORY_RETRY_FACTOR = 0.7


@dataclass(frozen=True)
class Verdict:
    give_up: bool  # fail the task instead of resuming it
    note: str  # what was decided, for the log


def after_crash(task: TaskRecord, alone: int | None, first_missing: int, fed: int, why: str) -> Verdict:
    """Update the task's culprit hunt after its model process died or hung.

    `alone` is the line that ran by itself when it happened (None if none did); `first_missing` the
    lowest line without a committed result; `fed` the highest line handed to the engine.
    """
    task.crashes += 1
    if alone is not None and alone not in task.poison:
        task.poison.append(alone)
        note = f"line {alone} of {task.job_id} crashed the model process again, alone; it fails with engine_crash"
    elif 0 <= first_missing <= task.suspect_until:
        task.isolate_until = max(task.isolate_until, task.suspect_until)
        note = f"lines up to {task.isolate_until} were in flight at two crashes; running them one at a time"
    else:
        note = "restarting at full speed"
    task.suspect_until = max(task.suspect_until, fed)
    if task.crashes > MAX_CRASHES_WITHOUT_CULPRIT + len(task.poison):
        return Verdict(True, f"the model process crashed {task.crashes} times ({why})")
    return Verdict(False, note)


def after_shard_crash(crashes: int, alone: bool) -> str:
    """A copy died on a shard (`crashes` deaths so far, counting this one): `poison` when its one line
    killed copies twice (it fails with engine_crash), `split` when a shard of several lines killed two
    (its lines run one at a time), else `again` (most deaths are not a request's fault)."""
    if crashes >= 2:
        return "poison" if alone else "split"
    return "again"


def memory_retry_utilization(engine_args: dict, tried: bool) -> float | None:
    """The smaller `gpu_memory_utilization` to try once after a load failed for memory, or None."""
    if tried:
        return None
    try:
        current = float(engine_args.get("gpu_memory_utilization", 0.9))
    except (TypeError, ValueError):
        return None
    return round(current * MEMORY_RETRY_FACTOR, 3)


def suspects(marks: dict[str, tuple[int, int]], alone: str | None) -> list[str]:
    """The tasks a crash of a shared model process counts against: the one whose line ran alone, else
    each task that had uncommitted lines in flight (marks: first line without a committed result,
    highest line fed)."""
    if alone is not None:
        return [alone]
    return [key for key, (missing, fed) in marks.items() if fed >= missing]


def shared_crash(
    keys: list[str], marks: dict[str, tuple[int, int]], last: dict[str, int], solo: set[str]
) -> str:
    """A crash with several tasks in flight counts against none of them. The first restarts them at
    full speed, sharing; a second one while a suspect of the first still had the same lines uncommitted
    makes every suspect run alone (one task at a time), where the single-task hunt finds the line."""
    again = [k for k in keys if k in last and marks[k][0] <= last[k]]
    last.clear()
    last.update({k: marks[k][1] for k in keys})
    if again:
        solo.update(keys)
        return f"crashed again with the same tasks in flight; running {', '.join(sorted(keys))} one task at a time"
    return "restarting at full speed; no task is counted a crash"
