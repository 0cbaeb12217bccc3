"""When things happened in a daemon's run, from its log's timestamps: the phases the benchmarks
print (settle and claim, process start, engine load, generation, publish), and RSS from /proc.

Log lines look like `2026-12-01 11:31:02,449 INFO took ...` (local time, milliseconds).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)$")


def entries(log: Path) -> list[tuple[float, str]]:
    """(epoch seconds, message) of every line of a daemon log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if m:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m.group(2)))
    return out


def first(log: list[tuple[float, str]], pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
    """The time and match of the first message matching `pattern` at or after `after`."""
    rx = re.compile(pattern)
    for t, msg in log:
        if t >= after and (m := rx.search(msg)):
            return t, m
    return None


def at(log: list[tuple[float, str]], pattern: str, after: float = 0.0) -> float | None:
    found = first(log, pattern, after)
    return found[0] if found else None


def engine_load_lines(engine_log: Path) -> dict[str, float]:
    """What vLLM says its load cost (seconds), from the model process's log."""
    text = engine_log.read_text(errors="replace") if engine_log.exists() else ""
    found = {}
    for name, rx in (
        ("weights", r"Loading weights took ([\d.]+) seconds"),
        ("model load", r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds"),
        ("torch.compile", r"torch\.compile took ([\d.]+) s in total"),
        ("compiled graph from the cache", r"Directly load the compiled graph.* took ([\d.]+) s"),
        (
            "init engine (profile, KV cache, warmup)",
            r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
        ),
    ):
        values = [float(x) for x in re.findall(rx, text)]
        if values:
            found[name] = round(sum(values), 2)
    return found


def race_phases(root: Path, t_drop: float, t_exit: float) -> dict[str, float]:
    """Where a `run --once` drop's end-to-end time went, from its daemon log and marker."""
    import json

    log = entries(root / "state/daemon.log")
    marker = json.loads(next((root / "state").glob("*/*/*.marker")).read_text())
    watching = at(log, r"^watching ")
    took = at(log, r"^took ")
    loading = at(log, r"^loading ")
    loaded = at(log, r"^loaded ")
    published = at(log, r"^published ")
    marks = [
        ("daemon start (python, imports)", t_drop, watching),
        ("settle and claim", watching, took),
        ("queue to model process start", took, loading),
        ("process start and engine load", loading, loaded),
        ("loaded to the first line fed", loaded, marker["started_at"]),
        ("generation (first fed to last commit)", marker["started_at"], marker["updated_at"]),
        ("last commit to published", marker["updated_at"], published),
        ("published to the daemon's exit", published, t_exit),
    ]
    return {name: round(b - a, 2) for name, a, b in marks if a is not None and b is not None}


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process in MB, from /proc; zeros once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    now = re.search(r"VmRSS:\s+(\d+)", text)
    peak = re.search(r"VmHWM:\s+(\d+)", text)
    return (int(now.group(1)) / 1024 if now else 0.0), (int(peak.group(1)) / 1024 if peak else 0.0)


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


class PeakSampler:
    """Samples a daemon and its model processes every `interval` s; keeps each one's peak RSS."""

    def __init__(self, daemon_pid: int, interval: float = 0.1) -> None:
        self.daemon_pid, self.interval = daemon_pid, interval
        self.daemon_peak = 0.0
        self.model_peak = 0.0

    def sample(self) -> None:
        self.daemon_peak = max(self.daemon_peak, *rss_mb(self.daemon_pid))
        for child in children(self.daemon_pid):
            self.model_peak = max(self.model_peak, *rss_mb(child))

    def until(self, done, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sample()
            if done():
                return True
            time.sleep(self.interval)
        return False
