"""Issue 22's targets beside the noisy neighbours (noisy.py): preemption across models, the memory of
eight shared tasks, and vLLM's own preemptions (KV cache full) with 1 and 8 tasks.

`python bench/sharing_targets.py [--scale S] [--only preempt,memory,kv]`; section 9 of bench/run.py
runs it after noisy.py. Every figure is printed with the load average of its run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from noisy import FINAL, drop, lines, status, wait_final
from timeline import PeakSampler, at, entries, first

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def start(root: Path, settings: str, models: str) -> subprocess.Popen:
    (root / "models.yaml").write_text(f"settings: {{{settings}}}\nmodels:\n{models}")
    return subprocess.Popen(
        [PY, "-m", "dropbox_runner", "run", "--root", str(root)], stderr=subprocess.DEVNULL, env=ENV
    )


def stop(d: subprocess.Popen) -> None:
    d.send_signal(signal.SIGTERM)
    d.wait(timeout=120)


def verdict(name: str, value: float, target: float, op: str = "<=") -> bool:
    met = value <= target if op == "<=" else value >= target
    print(f"- {name}: {value:.2f} (target {op} {target:.2f}: {'met' if met else 'NOT met'})")
    return met


# -- preemption across models ------------------------------------------------------------------------
PREEMPT_AFTER = 5.0


def preempt_once(root: Path, age: float) -> dict:
    """Team a's long job on model a; when a's process is `age` s old, a job of priority 10 for b."""
    (root / "inbox/a").mkdir(parents=True)
    (root / "inbox/b").mkdir(parents=True)
    pace = "delay_ms: 20, max_in_flight: 8, load_delay_ms: 1000"  # a load of 1 s besides the process start
    d = start(
        root,
        f"settle_seconds: 0.5, commit_interval_ms: 200, preempt_after_seconds: {PREEMPT_AFTER:g}",
        f"  a: {{engine: echo, engine_args: {{{pace}}}}}\n  b: {{engine: echo, engine_args: {{{pace}}}}}\n",
    )
    log_path = root / "state/daemon.log"
    try:
        drop(root, "long", 20000, "a", model="a")
        while not (log_path.exists() and at(entries(log_path), r"^loading a$")):
            time.sleep(0.02)
        loading_a = at(entries(log_path), r"^loading a$")
        time.sleep(max(0.0, loading_a + age - time.time()))
        t_drop = drop(root, "urgent", 50, "b", model="b", priority=10)
        t_first = None
        deadline = time.time() + 120
        while t_first is None and time.time() < deadline:
            for m in (root / "state").glob("*/*/b.marker"):
                try:
                    if json.loads(m.read_text())["count"] > 0:
                        t_first = time.time()
                except (json.JSONDecodeError, KeyError):
                    pass
            time.sleep(0.02)
        wait_final(root, ["urgent"], 60)
    finally:
        stop(d)
    log = entries(log_path)
    ended = first(log, r"^swap: ended a \(pid \d+\) in ([\d.]+)s")
    loading_b = at(log, r"^loading b$")
    loaded_b = first(log, r"^loaded b in ([\d.]+)s")
    unload = float(ended[1].group(1))
    load = loaded_b[0] - loading_b  # process start and engine load, as the daemon saw them
    real_age = t_drop - loading_a
    bound = max(0.0, PREEMPT_AFTER - real_age) + unload + load + 1.0
    return {
        "age_at_drop": real_age,
        "first_result_s": t_first - t_drop if t_first else float("inf"),
        "unload_s": unload,
        "load_s": load,
        "engine_load_s": float(loaded_b[1].group(1)),
        "bound_s": bound,
        "drop_to_preempt_s": at(log, r"^preempt: ") - t_drop,
        "preempt_to_ended_s": ended[0] - at(log, r"^preempt: "),
        "loaded_to_first_s": (t_first or float("inf")) - loaded_b[0],
        "load_average": os.getloadavg()[0],
    }


def bench_preempt(tmp: Path) -> list[dict]:
    print(
        f"\n## 9b. Preemption across models (preempt_after_seconds {PREEMPT_AFTER:g}; echo paced 20 ms, "
        "8 in flight, each model's load 1 s + process start; settle 0.5 s; first result = first commit (at once; "
        "later commits every 200 ms)\n"
    )
    out = []
    print("| drop at age s | first result s | wait s | unload s | load s (engine) | bound s | load avg |")
    print("|---|---|---|---|---|---|---|")
    for i, age in enumerate((2.0, 8.0)):
        r = preempt_once(tmp / f"preempt-{i}", age)
        out.append(r)
        print(
            f"| {r['age_at_drop']:.2f} | {r['first_result_s']:.2f} | {max(0, PREEMPT_AFTER - r['age_at_drop']):.2f} "
            f"| {r['unload_s']:.2f} | {r['load_s']:.2f} ({r['engine_load_s']:.2f}) | {r['bound_s']:.2f} "
            f"| {r['load_average']:.1f} |"
        )
    print()
    for r in out:
        verdict(
            f"first result after the drop at age {r['age_at_drop']:.1f} s", r["first_result_s"], r["bound_s"]
        )
        print(
            f"  (drop to the preempt decision {r['drop_to_preempt_s']:.2f} s, decision to a ended "
            f"{r['preempt_to_ended_s']:.2f} s, b loaded to its first result {r['loaded_to_first_s']:.2f} s)"
        )
    sys.stdout.flush()
    return out


# -- memory of eight shared tasks --------------------------------------------------------------------
def memory_once(root: Path, tasks: int, n: int, src: Path) -> dict:
    (root / "inbox/fast").mkdir(parents=True)
    d = start(
        root,
        "settle_seconds: 0.2, commit_interval_ms: 200, max_shared_tasks: 8",
        "  fast: {engine: echo, engine_args: {max_in_flight: 1024}}\n",
    )
    sampler = PeakSampler(d.pid)
    try:
        t0 = time.time()
        names = [f"m{i}" for i in range(tasks)]
        for name in names:
            os.link(src, root / f"inbox/fast/{name}.jsonl")
        ok = sampler.until(lambda: all(status(root, x) in FINAL for x in names), timeout=1800)
        wall = time.time() - t0
    finally:
        stop(d)
    return {
        "tasks": tasks,
        "lines_each": n,
        "finished": ok,
        "wall_s": wall,
        "daemon_peak_mb": sampler.daemon_peak,
        "model_peak_mb": sampler.model_peak,
        "load_average": os.getloadavg()[0],
    }


def bench_memory(tmp: Path, scale: float) -> dict:
    n = max(1000, round(100_000 * scale))
    src = tmp / "memory.jsonl"
    src.write_text(lines(n, "mem"))
    one = memory_once(tmp / "mem-1", 1, n, src)
    eight = memory_once(tmp / "mem-8", 8, n, src)
    print(
        f"\n## 9c. Memory: 8 shared tasks of {n:,} lines against 1 (echo, unpaced; peak RSS sampled from "
        "/proc every 0.1 s)\n"
    )
    print("| tasks | wall s | daemon peak MB | model process peak MB | load avg |\n|---|---|---|---|---|")
    for r in (one, eight):
        print(
            f"| {r['tasks']} | {r['wall_s']:.1f} | {r['daemon_peak_mb']:.1f} | {r['model_peak_mb']:.1f} "
            f"| {r['load_average']:.1f} |"
        )
    print()
    verdict("daemon peak with 8 tasks, MB", eight["daemon_peak_mb"], 100.0)
    growth = eight["model_peak_mb"] - one["model_peak_mb"]
    verdict("model process peak with 8 tasks minus with 1, MB", growth, 300.0)
    sys.stdout.flush()
    return {"one": one, "eight": eight, "model_growth_mb": growth}


# -- vLLM's own preemptions with 1 and 8 tasks --------------------------------------------------------
KV_BYTES = 4 * 2**20  # 2,048 tokens of tiny-llama's KV cache (2,048 bytes a token): about 5 requests of 400
KV_TOKENS = 400  # several KV blocks a request (vLLM's CPU blocks hold 128 tokens): a short one never grows


def kv_once(root: Path, tasks: int, n: int) -> dict:
    (root / "inbox/tiny-llama").mkdir(parents=True)
    args = f"{{dtype: float32, max_model_len: 512, kv_cache_memory_bytes: {KV_BYTES}}}"
    (root / "models.yaml").write_text(
        f"settings: {{settle_seconds: 0.2, max_shared_tasks: 8}}\nmodels:\n"
        f"  tiny-llama: {{path: {REPO}/models/tiny-llama, engine_args: {args}}}\n"
    )
    from run import chat_lines  # the speed race's lines (greedy, ignore_eos), KV_TOKENS tokens each

    body = chat_lines(n, KV_TOKENS)
    per = n // tasks
    for i in range(tasks):  # staged, so that one scan takes them all
        (root / f"inbox/tiny-llama/.k{i}.tmp").write_text("\n".join(body[i * per : (i + 1) * per]) + "\n")
    for i in range(tasks):
        os.replace(root / f"inbox/tiny-llama/.k{i}.tmp", root / f"inbox/tiny-llama/k{i}.jsonl")
    t0 = time.time()
    subprocess.run(
        [PY, "-m", "dropbox_runner", "run", "--once", "--root", str(root)], capture_output=True, env=ENV
    )
    wall = time.time() - t0
    found = first(entries(root / "state/daemon.log"), r"the engine preempted (\d+) requests")
    tokens = sum(
        json.loads((root / f"outbox/k{i}/batch.json").read_text())["usage"]["output_tokens"]
        for i in range(tasks)
    )
    return {
        "tasks": tasks,
        "engine_preemptions": int(found[1].group(1)) if found else None,
        "tokens": tokens,
        "wall_s": wall,
        "load_average": os.getloadavg()[0],
    }


def bench_kv(tmp: Path, scale: float) -> list[dict]:
    n = max(64, round(256 * scale)) // 8 * 8
    out = [kv_once(tmp / f"kv-{k}", k, n) for k in (1, 8)]
    print(
        f"\n## 9d. vLLM's own preemptions (KV cache full): tiny-llama compiled, KV cache {KV_BYTES // 2**20} MiB, "
        f"{n:,} requests x {KV_TOKENS} tokens as 1 task and as 8\n"
    )
    print("| tasks | vLLM preemptions | tokens | wall s (load included) | load avg |\n|---|---|---|---|---|")
    for r in out:
        print(
            f"| {r['tasks']} | {r['engine_preemptions']} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['load_average']:.1f} |"
        )
    sys.stdout.flush()
    return out


def bench_targets(tmp: Path, scale: float, only: set[str]) -> dict:
    out = {}
    if "preempt" in only:
        out["preempt"] = bench_preempt(tmp)
    if "memory" in only:
        out["memory"] = bench_memory(tmp, scale)
    if "kv" in only:
        out["kv"] = bench_kv(tmp, scale)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="of the line counts (1: the issue's)")
    ap.add_argument("--only", default="preempt,memory,kv")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        bench_targets(Path(t), a.scale, set(a.only.split(",")))
