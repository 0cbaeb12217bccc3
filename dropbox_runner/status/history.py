"""The daemon's bounded history for the page and /metrics: completed requests and tokens per model
(and per running task) over time, model loads and swaps, in `state/history.json` (rewritten
atomically, fixed size).

Totals are cumulative since the history began, so a point's difference with the one before is the
work done in between, whatever restarts came between them.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import orjson

from dropbox_runner.fsutil import read_json_or_none, write_atomic
from dropbox_runner.layout import Layout

POINT_SECONDS = 10.0
MAX_POINTS = 8640  # 24 hours of points
MAX_EVENTS = 200  # loads and swaps kept


class History:
    def __init__(
        self,
        layout: Layout,
        clock: Any = time.time,
        every: float = POINT_SECONDS,
        ticker: Any = time.monotonic,
    ) -> None:
        """`clock` gives a point's `t` (Unix seconds, as saved); `ticker` times the points' cadence
        (monotonic: a wall-clock jump neither stalls the points nor bunches them)."""
        self.path = layout.history
        self.clock, self.every, self.ticker = clock, every, ticker
        saved = read_json_or_none(self.path)
        saved = saved if isinstance(saved, dict) else {}
        self.points: deque[dict[str, Any]] = deque(saved.get("points") or [], maxlen=MAX_POINTS)
        self.loads: deque[dict[str, Any]] = deque(saved.get("loads") or [], maxlen=MAX_EVENTS)
        self.swaps: deque[dict[str, Any]] = deque(saved.get("swaps") or [], maxlen=MAX_EVENTS)
        self.totals: dict[str, dict[str, float]] = saved.get("totals") or {}
        self.last_point = float("-inf")
        self.running: dict[str, dict[str, Any]] = {}  # task id -> its group and totals, while it runs

    def _model(self, model: str) -> dict[str, float]:
        return self.totals.setdefault(model, {"requests": 0, "tokens": 0, "loads": 0, "load_seconds": 0.0})

    def done(self, model: str, requests: int, tokens: int) -> None:
        """Requests and completion tokens newly committed for a model."""
        totals = self._model(model)
        totals["requests"] += requests
        totals["tokens"] += tokens

    def task_progress(self, task_id: str, group: str, requests: int, tokens: int) -> None:
        """A running task's committed requests and completion tokens so far (a series per task)."""
        self.running[task_id] = {"group": group, "requests": requests, "tokens": tokens}

    def task_ended(self, task_id: str) -> None:
        self.running.pop(task_id, None)

    def loaded(self, model: str, started_at: float, seconds: float) -> None:
        totals = self._model(model)
        totals["loads"] += 1
        totals["load_seconds"] = round(totals["load_seconds"] + seconds, 3)
        self.loads.append(
            {"model": model, "start": round(started_at, 3), "end": round(started_at + seconds, 3)}
        )

    def swapped(self, model: str, started_at: float, seconds: float) -> None:
        self.swaps.append(
            {"model": model, "start": round(started_at, 3), "end": round(started_at + seconds, 3)}
        )

    def tick(self, force: bool = False, save: bool = True) -> bool:
        """Add a point every POINT_SECONDS (and save it); True if it did."""
        tick = self.ticker()
        if not force and tick - self.last_point < self.every:
            return False
        self.last_point, now = tick, self.clock()
        models = {
            m: {"requests": int(t["requests"]), "tokens": int(t["tokens"])} for m, t in self.totals.items()
        }
        point: dict[str, Any] = {"t": round(now, 3), "models": models}
        if self.running:  # at most max_shared_tasks of them: the points stay bounded
            point["tasks"] = {k: dict(v) for k, v in self.running.items()}
        self.points.append(point)
        if save:
            self.save()
        return True

    def document(self) -> dict[str, Any]:
        return {
            "points": list(self.points),
            "loads": list(self.loads),
            "swaps": list(self.swaps),
            "totals": self.totals,
        }

    def save(self) -> None:
        write_atomic(self.path, orjson.dumps(self.document()), durable=False)


def recent_rates(history: dict[str, Any], seconds: float = 60.0) -> dict[str, float]:
    """Tokens per second per model over the last `seconds` of points (a moving average)."""
    points = history.get("points") or []
    if len(points) < 2:
        return {}
    last = points[-1]
    first = next((p for p in points if p["t"] >= last["t"] - seconds - POINT_SECONDS / 2), points[-2])
    span = last["t"] - first["t"]
    if span <= 0:
        return {}
    rates = {}
    for model, now in last["models"].items():
        before = first["models"].get(model, {"tokens": 0})
        rates[model] = round(max(0, now["tokens"] - before["tokens"]) / span, 1)
    return rates


def read_history(layout: Layout) -> dict[str, Any]:
    """The saved history as plain JSON (for status and the API), empty if there is none."""
    saved = read_json_or_none(layout.history)
    if not isinstance(saved, dict):
        return {"points": [], "loads": [], "swaps": [], "totals": {}}
    return saved
