"""Noisy neighbours (issue 22's targets, on the echo engine paced like a GPU: 20 ms a request, 8 in
flight): team a's big job, and small jobs of team b dropped every 3 s while it runs. Each small job's
turnaround (drop to final batch.json) against the same job on an idle loaded daemon, and the whole
run's rate against the same work one task at a time (`max_shared_tasks: 1`).

`python bench/noisy.py [--quick]`, or section 9 of bench/run.py.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PY = sys.executable
FINAL = ("completed", "failed", "cancelled", "expired")


def lines(n: int, tag: str) -> str:
    out = []
    for i in range(n):
        body = {
            "messages": [{"role": "user", "content": f"{tag} question {i} " + "w " * 10}],
            "max_tokens": 8,
        }
        out.append(
            json.dumps(
                {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            )
        )
    return "\n".join(out) + "\n"


def make_root(base: Path, slots: int) -> Path:
    root = base / f"root-{slots}"
    (root / "inbox/paced").mkdir(parents=True)
    (root / "models.yaml").write_text(
        f"settings: {{settle_seconds: 0.5, commit_interval_ms: 200, max_shared_tasks: {slots}}}\n"
        "models:\n  paced: {engine: echo, engine_args: {delay_ms: 20, max_in_flight: 8}}\n"
    )
    return root


def drop(root: Path, name: str, n: int, team: str) -> float:
    (root / f"inbox/paced/{name}.manifest.json").write_text(json.dumps({"metadata": {"team": team}}))
    tmp = root / f"inbox/paced/.{name}.tmp"
    tmp.write_text(lines(n, name))
    os.replace(tmp, root / f"inbox/paced/{name}.jsonl")
    return time.time()


def status(root: Path, name: str) -> str | None:
    try:
        return json.loads((root / "outbox" / name / "batch.json").read_text())["status"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def wait_final(root: Path, names: list[str], timeout: float, done: dict | None = None) -> dict[str, float]:
    """When each job's batch.json became final (polled every 50 ms)."""
    done = {} if done is None else done
    deadline = time.time() + timeout
    while len(done) < len(names) and time.time() < deadline:
        for n in names:
            if n not in done and status(root, n) in FINAL:
                done[n] = time.time()
        time.sleep(0.05)
    return done


def run(base: Path, slots: int, big: int, small: int, every: float) -> dict:
    root = make_root(base, slots)
    d = subprocess.Popen([PY, "-m", "dropbox_runner", "run", "--root", str(root)], stderr=subprocess.DEVNULL)
    try:
        t0 = drop(root, "big", big, "a")
        while status(root, "big") != "in_progress":
            time.sleep(0.05)
        names = ["big", *(f"s{i}" for i in range(small))]
        done: dict[str, float] = {}
        watcher = threading.Thread(target=wait_final, args=(root, names, 600, done))
        watcher.start()  # each job's end is seen while the next ones are dropped
        dropped = {}
        for i in range(small):
            dropped[f"s{i}"] = drop(root, f"s{i}", 50, "b")
            time.sleep(every)
        watcher.join()
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=60)
    turn = [done[n] - t for n, t in dropped.items() if n in done]
    wall = max(done.values()) - t0
    return {"turnaround": turn, "requests_per_second": (big + 50 * small) / wall, "wall": wall}


def idle(base: Path, small: int) -> list[float]:
    root = make_root(base, 8)
    d = subprocess.Popen([PY, "-m", "dropbox_runner", "run", "--root", str(root)], stderr=subprocess.DEVNULL)
    try:
        drop(root, "warm", 1, "b")
        wait_final(root, ["warm"], timeout=120)
        out = []
        for i in range(small):
            t = drop(root, f"i{i}", 50, "b")
            out.append(wait_final(root, [f"i{i}"], timeout=120)[f"i{i}"] - t)
        return out
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=60)


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def bench_noisy(tmp: Path, quick: bool) -> dict:
    big, small = (4000, 5) if quick else (20000, 20)
    alone = idle(tmp / "idle", 5)
    shared = run(tmp / "shared", 8, big, small, 3.0)
    serial = run(tmp / "serial", 1, big, small, 3.0)
    base = statistics.median(alone)
    result = {
        "idle_turnaround_median": base,
        "shared_turnaround_p95": p95(shared["turnaround"]),
        "serial_turnaround_p95": p95(serial["turnaround"]),
        "p95_over_idle": p95(shared["turnaround"]) / base,
        "aggregate_ratio": shared["requests_per_second"] / serial["requests_per_second"],
        "shared_rps": shared["requests_per_second"],
        "serial_rps": serial["requests_per_second"],
    }
    print("\n## 9. Noisy neighbours (echo paced 20 ms, 8 in flight)\n")
    print("| measure | value | target |\n|---|---|---|")
    print(f"| small job turnaround, idle daemon (median) | {base:.2f} s | |")
    print(f"| small job turnaround p95, sharing | {result['shared_turnaround_p95']:.2f} s | <= 3x idle |")
    print(f"| p95 / idle | {result['p95_over_idle']:.2f} | <= 3 |")
    print(f"| small job turnaround p95, one task at a time | {result['serial_turnaround_p95']:.2f} s | |")
    print(f"| aggregate requests/s, sharing / one at a time | {result['aggregate_ratio']:.3f} | >= 0.97 |")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as t:
        bench_noisy(Path(t), "--quick" in sys.argv)
