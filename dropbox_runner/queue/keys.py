"""Queue keys: the names of the entries in `state/queue/`, whose lexical order is queue order.

A key is `<rank>-<created_ns>-<job id>-<model>`: `rank` (7 digits) is PRIORITY_SPAN minus the
priority, clamped to [0, 2 * PRIORITY_SPAN], so a higher priority sorts first; `created_ns` (20
digits) is the arrival, in nanoseconds. A job id has no `-` (`batch_<hex>`); a model name may, so it
is everything after the job id. `QueueKey` is the only writer and reader of this form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

PRIORITY_SPAN = 500_000
MAX_RANK = 2 * PRIORITY_SPAN
RANK_DIGITS, CREATED_DIGITS = 7, 20
_KEY = re.compile(rf"(\d{{{RANK_DIGITS}}})-(\d{{{CREATED_DIGITS}}})-([^-/]+)-([^/]+)", re.ASCII)


class BadQueueKey(ValueError):
    pass


@dataclass(frozen=True)
class QueueKey:
    rank: int
    created_ns: int
    job_id: str
    model: str

    def __post_init__(self) -> None:
        if not 0 <= self.rank <= MAX_RANK:
            raise BadQueueKey(f"a queue rank is 0 to {MAX_RANK}, not {self.rank}")
        if not 0 <= self.created_ns < 10**CREATED_DIGITS:
            raise BadQueueKey(f"an arrival time in nanoseconds has at most 20 digits: {self.created_ns}")
        if not self.job_id or "-" in self.job_id or "/" in self.job_id:
            raise BadQueueKey(f"a job id in a queue key is not empty and has no - or /: {self.job_id!r}")
        if not self.model or "/" in self.model:
            raise BadQueueKey(f"a model name in a queue key is not empty and has no /: {self.model!r}")

    @classmethod
    def of(cls, priority: int, created_ns: int, job_id: str, model: str) -> QueueKey:
        """The key of a task of this priority, arrived at created_ns (Unix nanoseconds)."""
        return cls(min(max(PRIORITY_SPAN - priority, 0), MAX_RANK), created_ns, job_id, model)

    @classmethod
    def parse(cls, key: str) -> QueueKey:
        """The key an entry's name spells; raises BadQueueKey for any other name."""
        return _parse(key)

    def __str__(self) -> str:
        return f"{self.rank:0{RANK_DIGITS}d}-{self.created_ns:0{CREATED_DIGITS}d}-{self.job_id}-{self.model}"

    @property
    def queued_at(self) -> float:
        """The arrival, in Unix seconds."""
        return self.created_ns / 1e9


@lru_cache(maxsize=16384)
def _parse(key: str) -> QueueKey:
    """Cached: the scheduler reads the rank and arrival of every queued key on each turn of the loop."""
    m = _KEY.fullmatch(key)
    if m is None:
        raise BadQueueKey(f"{key[:200]!r} is not a queue key (<rank>-<created_ns>-<job id>-<model>)")
    return QueueKey(int(m[1]), int(m[2]), m[3], m[4])
