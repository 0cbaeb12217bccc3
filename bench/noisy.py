"""Noisy neighbours (issue 22's targets, on the echo engine paced like a GPU: 20 ms a request, 8 in
flight): team a's big job, and small jobs of team b dropped every 3 s while it runs. Each small job's
turnaround (drop to final batch.json) against the same job on an idle loaded daemon, and the whole
run's rate against the same work one task at a time (`max_shared_tasks: 1`).

`python bench/noisy.py [--scale S] [--rounds N]`, or section 9 of bench/run.py.
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


def drop(root: Path, name: str, n: int, team: str, model: str = "paced", priority: int = 0) -> float:
    """Stage a job of `n` lines with its manifest, rename it into the model's inbox: the drop's time."""
    manifest = {"metadata": {"team": team}, "priority": priority}
    (root / f"inbox/{model}/{name}.manifest.json").write_text(json.dumps(manifest))
    tmp = root / f"inbox/{model}/.{name}.tmp"
    tmp.write_text(lines(n, name))
    os.replace(tmp, root / f"inbox/{model}/{name}.jsonl")
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
    tokens = sum(
        json.loads((root / "outbox" / n / "batch.json").read_text())["usage"]["output_tokens"] for n in done
    )
    return {
        "turnaround": turn,
        "requests_per_second": (big + 50 * small) / wall,
        "tokens_per_second": tokens / wall,
        "wall": wall,
        "load_average": os.getloadavg()[0],
    }


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


def sizes(scale: float) -> tuple[int, int]:
    """Team a's lines and team b's jobs at this scale (1: the issue's 20,000 and 20)."""
    return max(1000, round(20000 * scale)), max(3, round(20 * scale))


def bench_noisy(tmp: Path, scale: float = 1.0, rounds: int = 3) -> dict:
    """Idle turnaround once, then `rounds` interleaved pairs of runs (sharing, one task at a time,
    the order alternating); every figure is printed with the load average of its run."""
    big, small = sizes(scale)
    alone = idle(tmp / "idle", 5)
    base = statistics.median(alone)
    runs: dict[str, list[dict]] = {"shared": [], "serial": []}
    for r in range(rounds):
        for kind in ("shared", "serial") if r % 2 == 0 else ("serial", "shared"):
            runs[kind].append(run(tmp / f"{kind}-{r}", 8 if kind == "shared" else 1, big, small, 3.0))
    shared, serial = runs["shared"], runs["serial"]
    med = {(k, m): statistics.median(x[m] for x in runs[k]) for k in runs for m in RATES}
    p95s = [p95(x["turnaround"]) for x in shared]
    result = {
        "scale": scale,
        "idle_turnaround_median": base,
        "shared_turnaround_p95": p95s,
        "serial_turnaround_p95": [p95(x["turnaround"]) for x in serial],
        "p95_over_idle": statistics.median(p95s) / base,
        "ratios": {m: med[("shared", m)] / med[("serial", m)] for m in RATES},
        "runs": runs,
    }
    print(
        f"\n## 9. Noisy neighbours (echo paced 20 ms, 8 in flight; team a {big:,} lines, team b {small} "
        f"jobs of 50 every 3 s; scale {scale:g}; {rounds} interleaved rounds)\n"
    )
    print(f"small job turnaround on an idle loaded daemon: median {base:.2f} s of {len(alone)}\n")
    print("| round | kind | small p95 s | requests/s | tokens/s | load avg |\n|---|---|---|---|---|---|")
    for r in range(rounds):
        for kind in ("shared", "serial"):
            x = runs[kind][r]
            print(
                f"| {r + 1} | {kind} | {p95(x['turnaround']):.2f} | {x['requests_per_second']:.1f} | "
                f"{x['tokens_per_second']:.1f} | {x['load_average']:.1f} |"
            )
    print()
    verdict("small job turnaround p95 / idle (median of the rounds)", result["p95_over_idle"], 3.0, "<=")
    print(f"  (each round: {', '.join(f'{x / base:.2f}' for x in p95s)})")
    for m in RATES:
        each = [a[m] / b[m] for a, b in zip(shared, serial, strict=True)]
        verdict(
            f"aggregate {m.replace('_', ' ')}, sharing / one task at a time (ratio of medians)",
            result["ratios"][m],
            0.97,
            ">=",
        )
        print(f"  (each round: {', '.join(f'{x:.3f}' for x in each)})")
    sys.stdout.flush()
    return result


RATES = ("requests_per_second", "tokens_per_second")


def verdict(name: str, value: float, target: float, op: str) -> bool:
    met = value <= target if op == "<=" else value >= target
    print(f"- {name}: {value:.3f} (target {op} {target:g}: {'met' if met else 'NOT met'})")
    return met


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="of the line and job counts (1: the issue's)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        bench_noisy(Path(t), a.scale, a.rounds)
