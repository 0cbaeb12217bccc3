"""The queue's order: priority, arrival, the loaded model first within a bound; one model at a time."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from dropbox_runner.queue.journal import queue_key
from dropbox_runner.queue.scheduler import pick

from helpers import (
    batch_json,
    chat_line,
    finished,
    gated_job,
    models_yaml,
    open_gate,
    run_once,
    snapshot,
    wait_for,
    write_jsonl,
)


def entries(*items: tuple[int, float, str]) -> list[tuple[str, str, str]]:
    return sorted(
        (queue_key(p, int(t * 1e9), f"job{i}", m), f"job{i}", m) for i, (p, t, m) in enumerate(items)
    )


def test_priority_then_arrival() -> None:
    q = entries((0, 10, "a"), (5, 20, "b"), (0, 5, "c"))
    assert pick(q, None, 600, now=30).model == "b"
    assert pick(q[1:], None, 600, now=30).model == "c"


def test_loaded_model_first_until_the_head_has_waited_too_long() -> None:
    q = entries((0, 100, "a"), (0, 110, "b"), (0, 120, "a"))
    choice = pick(q, "b", 600, now=200)
    assert choice.model == "b" and "is loaded" in choice.reason
    choice = pick(q, "b", 60, now=200)
    assert choice.model == "a" and "waited" in choice.reason


def test_loaded_model_does_not_jump_a_higher_priority() -> None:
    q = entries((9, 100, "a"), (0, 110, "b"))
    assert pick(q, "b", 600, now=120).model == "a"


def test_alternating_drops_cost_one_load_per_model(root: Path) -> None:
    for i in range(3):
        write_jsonl(root / f"inbox/echo/a{i}.jsonl", [chat_line(0)])
        write_jsonl(root / f"inbox/echo2/b{i}.jsonl", [chat_line(0)])
    (root / "inbox/m.manifest.json").write_text(json.dumps({"models": ["echo", "echo2"]}))
    write_jsonl(root / "inbox/m.jsonl", [chat_line(0)])
    proc = run_once(root)
    assert proc.stderr.count("loading echo\n") == 1
    assert proc.stderr.count("loading echo2\n") == 1


def test_starvation_bound_and_never_two_model_processes(root: Path, daemon) -> None:
    models_yaml(root, settings={"max_swap_delay_seconds": 2, "preempt_after_seconds": 0})
    # The first task runs until the old task for another model is queued behind it and newer work
    # for the loaded model is queued too: its gated last line holds it, not the CPU's pace.
    write_jsonl(root / "inbox/gated/first.jsonl", gated_job(500))
    d = daemon(root)
    seen_at_once: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # from process listings: how many model processes are alive at each moment
        while not stop.is_set():
            workers = [
                p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_worker_of(p, d.proc.pid)
            ]
            seen_at_once.append(len(workers))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_for(lambda: snapshot(root).get("loaded_model") == "gated", what="gated loaded")
        write_jsonl(root / "inbox/echo/old.jsonl", [chat_line(0)])
        wait_for(lambda: batch_json(root, "old"), what="the old task queued")
        # Newer work for the loaded model keeps arriving, faster than it runs (3,000 lines at 1,600
        # lines/s every 0.5 s), until the old task has run; bounded in time, not in drops, so a busy
        # machine's slower swap does not fail it. The log below says the swap came from the bound.
        waiting_when_old_ran = []
        deadline, i = time.monotonic() + 60, 0
        while not finished(root, "old") and time.monotonic() < deadline:
            write_jsonl(root / f"inbox/gated/more{i}.jsonl", [chat_line(j) for j in range(3000)])
            i += 1
            if i == 1:
                wait_for(lambda: batch_json(root, "more0"), what="newer work queued")
                open_gate(root)  # the first task ends with both queued behind it
            time.sleep(0.5)
        if finished(root, "old"):
            waiting_when_old_ran = [n for n in range(i) if not finished(root, f"more{n}")]
        assert finished(root, "old"), "the old task for another model waited past the bound"
        assert waiting_when_old_ran, "newer work for the loaded model was still waiting"
    finally:
        stop.set()
        watcher.join()
        d.kill(signal.SIGTERM)
    assert max(seen_at_once) == 1
    log = (root / "state/daemon.log").read_text()
    assert "has waited" in log and "the most allowed" in log
    # The swap ended the loaded model's whole process group before the next model was loaded.
    swap = log.index("swap: ended gated")
    assert log.index("loading echo", swap) > swap


def _is_worker_of(proc: Path, daemon_pid: int) -> bool:
    try:
        cmd = (proc / "cmdline").read_bytes()
        stat = (proc / "stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return b"dropbox_runner.engine.worker" in cmd and int(fields[1]) == daemon_pid and fields[0] != "Z"
