"""Which task's line goes to the engine next when several tasks share one model process.

Strict priority between priorities. At one priority, groups (teams) share the engine by completion
tokens: each group has a clock of the completion tokens it was given, and the group whose clock is
lowest feeds next (fair queueing, the continuous form of deficit round robin). A line is charged an
estimate when it is fed (its task's mean completion tokens so far) and corrected by the real count
when it finishes, so a group asking for long answers pays for them. The tasks of a group share its
turn the same way. A group or task that becomes active starts at the lowest clock of those active,
so an idle spell earns no credit to crowd the others out with later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

FIRST_ESTIMATE = 16.0  # completion tokens charged for a line of a task with no finished line yet


@dataclass
class Share:
    """What the fair choice needs to know of a task."""

    key: str
    group: str
    priority: int
    charged: float = 0.0  # completion tokens charged to this task (estimates corrected by real counts)
    finished_lines: int = 0
    finished_tokens: int = 0
    estimates: dict[int, float] = field(default_factory=dict)  # lines in flight: what each was charged

    def estimate(self) -> float:
        if self.finished_lines:
            return max(1.0, self.finished_tokens / self.finished_lines)
        return FIRST_ESTIMATE


class Fairness:
    def __init__(self) -> None:
        self.clocks: dict[str, float] = {}  # group -> completion tokens charged to it
        self._groups: set[str] = set()  # groups that were candidates at the last choice
        self._tasks: set[str] = set()  # and tasks

    def choose(self, candidates: Iterable[Share]) -> Share | None:
        """The task whose line is fed next, among those that have a line ready."""
        ready = list(candidates)
        if len(ready) <= 1:  # a lone task: nothing to weigh (its clocks still move as it feeds)
            if ready:
                self._groups, self._tasks = {ready[0].group}, {ready[0].key}
            return ready[0] if ready else None
        top = max(s.priority for s in ready)
        ready = [s for s in ready if s.priority == top]
        groups: dict[str, list[Share]] = {}
        for s in ready:
            groups.setdefault(s.group, []).append(s)
        self._catch_up(groups)
        group = min(groups, key=lambda g: (self.clocks[g], g))
        return min(groups[group], key=lambda s: (s.charged, s.key))

    def _catch_up(self, groups: dict[str, list[Share]]) -> None:
        """Groups and tasks that were not candidates start level with the lowest of those that were."""
        floor = min((self.clocks[g] for g in groups if g in self._groups), default=0.0)
        for g, shares in groups.items():
            if g not in self._groups:
                self.clocks[g] = max(self.clocks.get(g, 0.0), floor)
            level = min((s.charged for s in shares if s.key in self._tasks), default=None)
            for s in shares:
                if s.key not in self._tasks and level is not None:
                    s.charged = max(s.charged, level)
        self._groups = set(groups)
        self._tasks = {s.key for shares in groups.values() for s in shares}

    def fed(self, share: Share, index: int) -> None:
        cost = share.estimate()
        share.estimates[index] = cost
        share.charged += cost
        self.clocks[share.group] = self.clocks.get(share.group, 0.0) + cost

    def finished(self, share: Share, index: int, completion_tokens: int) -> None:
        """Replace the line's estimate by what it really cost."""
        cost = share.estimates.pop(index, None)
        share.finished_lines += 1
        share.finished_tokens += completion_tokens
        if cost is None:
            return
        delta = completion_tokens - cost
        share.charged += delta
        self.clocks[share.group] = self.clocks.get(share.group, 0.0) + delta

    def forget(self, share: Share) -> None:
        """A line that left without a result (aborted): its estimate is taken back."""
        for cost in share.estimates.values():
            share.charged -= cost
            self.clocks[share.group] = self.clocks.get(share.group, 0.0) - cost
        share.estimates.clear()
