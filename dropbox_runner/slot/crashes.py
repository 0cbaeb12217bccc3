"""What to do when a model process or a copy dies or hangs: plain decisions over a task record,
over the tasks a shared process held, and over a copy's shard.

Most crashes are not the request's fault (a kill, a passing OOM), so a first crash restarts at full
speed. A second crash while lines fed at the first are still without a result starts a hunt over
those lines (the suspects), by halving: the process runs the first half alone (every other line held
back), then the first half of the rest, and so on down to the last line (`halves`). A part that ends
clean is cleared; a part that crashes becomes the hunt, halved again; a line that crashes alone fails
by itself (`engine_crash`). With one poison line among S suspects that is at most log2(S) + 1 more
crashes, each part running at full speed. Copies halve a shard that killed two of them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from dropbox_runner.queue.journal import TaskRecord

MAX_CRASHES_WITHOUT_CULPRIT = 5  # crashes that found no line and narrowed no hunt, before a task fails
MEMORY_RETRY_FACTOR = 0.7


@dataclass(frozen=True)
class Verdict:
    give_up: bool  # fail the task instead of resuming it
    note: str  # what was decided, for the log


def halves(suspects: list[int]) -> list[list[int]]:
    """The parts a hunt runs over `suspects` (sorted line indexes without a result), one after the
    other, as [first, last] ranges: the first half, then the first half of the rest, down to the last
    line. Once a part ended clean the culprit (if the crashes were its doing) is in the rest, so the
    rest is halved without running it whole."""
    parts, rest = [], list(suspects)
    while rest:
        size = (len(rest) + 1) // 2
        parts.append([rest[0], rest[size - 1]])
        rest = rest[size:]
    return parts


def after_crash(task: TaskRecord, trial: list[int] | None, first_missing: int, fed: int, why: str) -> Verdict:
    """Update the task's culprit hunt after its model process died or hung.

    `trial` is the lines of the hunt's part that was running, still without a committed result (None
    if no part ran); `first_missing` the lowest line without a committed result; `fed` the highest
    line handed to the engine.
    """
    task.crashes += 1
    if trial is not None and len(trial) == 1:
        task.poison.append(trial[0])
        task.hunt = []
        note = f"line {trial[0]} of {task.job_id} crashed the model process alone; it fails with engine_crash"
    elif trial:
        task.hunt = [trial[0], trial[-1]]
        task.narrowings += 1
        note = f"lines {trial[0]}-{trial[-1]} ({len(trial)} lines) crashed it; halving them"
    elif task.hunt:
        note = f"no part of the hunt over lines {task.hunt[0]}-{task.hunt[1]} was running; it goes on"
    elif first_missing <= task.suspect_until:
        task.hunt = [first_missing, task.suspect_until]
        note = f"lines {first_missing}-{task.suspect_until} were in flight at two crashes; halving them"
    else:
        note = "restarting at full speed"
    task.suspect_until = max(task.suspect_until, fed)
    if task.crashes > MAX_CRASHES_WITHOUT_CULPRIT + len(task.poison) + task.narrowings:
        return Verdict(True, f"the model process crashed {task.crashes} times ({why})")
    return Verdict(False, note)


def after_shard_crash(crashes: int, alone: bool) -> str:
    """A copy died on a shard (`crashes` deaths so far, counting this one): `poison` when its one line
    killed copies twice (it fails with engine_crash), `split` when a shard of several lines killed two
    (it is cut by `halves`, each part with one death already), else `again` (most deaths are not a
    request's fault)."""
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


def suspects(marks: dict[str, tuple[int, int]], trial: str | None) -> list[str]:
    """The tasks a crash of a shared model process counts against: the one whose hunt's part ran
    (nothing else runs beside it), else each task that had uncommitted lines in flight (marks: first
    line without a committed result, highest line fed)."""
    if trial is not None:
        return [trial]
    return [key for key, (missing, fed) in marks.items() if fed >= missing]


def shared_crash(
    keys: list[str], marks: dict[str, tuple[int, int]], last: dict[str, int]
) -> tuple[str, dict[str, list[int]]]:
    """A crash with several tasks in flight counts against none of them. The first restarts them at
    full speed, sharing. A second one, while suspects of the first still had the same lines
    uncommitted, gives each of those tasks a hunt over those lines (returned: task -> [first, last]);
    a task with a hunt runs alone, one task at a time, and halves its own lines only."""
    again = {k: [marks[k][0], last[k]] for k in keys if k in last and marks[k][0] <= last[k]}
    last.clear()
    last.update({k: marks[k][1] for k in keys})
    if again:
        names = ", ".join(sorted(again))
        return (
            f"crashed again with the same lines in flight; {names} halve their lines, one task at a time",
            again,
        )
    return "restarting at full speed; no task is counted a crash", {}
