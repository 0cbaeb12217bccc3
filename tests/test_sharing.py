"""Several tasks of the loaded model in one process (CONTRACT section 12): admission, groups,
feeding by completion tokens, priority, preemption, and every promise with tasks shared.

Work is held by the echo engine's pace (`delay_ms`, `max_in_flight`), never by the machine's speed.
"""

from __future__ import annotations

import getpass
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dropbox_runner.engine.fairness import Fairness, Share
from dropbox_runner.queue.journal import queue_key
from dropbox_runner.queue.scheduler import Held, admission

from helpers import (
    Daemon,
    batch_json,
    chat_line,
    finished,
    gated_job,
    models_yaml,
    read_jsonl,
    run_once,
    snapshot,
    wait_for,
    write_jsonl,
)

SHARED_YAML = """
settings:
  settle_seconds: 0.2
  rescan_seconds: 5
  commit_interval_ms: 50
  manifest_grace_seconds: 1
  max_shared_tasks: {slots}
  preempt_after_seconds: {preempt}
  max_swap_delay_seconds: {swap}
models:
  held: {{engine: echo, engine_args: {{delay_ms: {delay}, max_in_flight: 8, gate_on: GATE, gate_file: {gate}}}}}
  other: {{engine: echo, engine_args: {{delay_ms: 5, max_in_flight: 8}}}}
  crashy: {{engine: echo, engine_args: {{crash_on: POISON, max_in_flight: 4, delay_ms: 5}}}}
"""


def configure(root: Path, slots: int = 8, preempt: str = "null", swap: float = 600, delay: int = 40) -> None:
    models_yaml(
        root,
        text=SHARED_YAML.format(
            slots=slots, preempt=preempt, swap=swap, delay=delay, gate=root / "gate.open"
        ),
    )
    for m in ("held", "other", "crashy"):
        (root / "inbox" / m).mkdir(parents=True, exist_ok=True)


def drop(root: Path, model: str, name: str, n: int, manifest: dict | None = None, **body) -> Path:
    if manifest is not None:
        (root / f"inbox/{model}/{name}.manifest.json").write_text(json.dumps(manifest))
    return write_jsonl(root / f"inbox/{model}/{name}.jsonl", [chat_line(i, **body) for i in range(n)])


def running(root: Path) -> list[dict]:
    return snapshot(root).get("running") or []


def shares(root: Path) -> list[dict] | None:
    """The running tasks' rows of `status --json`, once each has a share of the last minute."""
    cmd = [sys.executable, "-m", "dropbox_runner", "status", "--json", "--root", str(root)]
    doc = json.loads(subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout)
    rows = [m for j in doc["jobs"] for m in j["models"] if m["status"] == "in_progress"]
    return rows if len(rows) == 3 and all(r["share"] is not None for r in rows) else None


def choices(root: Path, name: str, model: str) -> list:
    return [
        (x["custom_id"], x["response"]["body"]["choices"])
        for x in read_jsonl(root / f"outbox/{name}/{model}.jsonl")
    ]


def stop(d: Daemon) -> None:
    if d.alive():
        d.kill(signal.SIGTERM)


@pytest.fixture
def daemon(root: Path, daemon):
    """conftest's daemon fixture on this test's root (its finalizer ends them): daemon() starts one."""
    return lambda: daemon(root)


def marker(root: Path, name: str, model: str) -> dict:
    """The committed marker of a job's task (read from state/, committed every 50 ms)."""
    for folder in ("jobs", "archive"):
        for spec in (root / "state" / folder).glob("*/spec.json"):
            if json.loads(spec.read_text())["name"] == name:
                try:
                    return json.loads((spec.parent / f"{model}.marker").read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    return {"count": 0, "completion_tokens": 0}
    return {"count": 0, "completion_tokens": 0}


def task_record(root: Path, name: str, model: str) -> dict:
    for folder in ("jobs", "archive"):
        for spec in (root / "state" / folder).glob("*/spec.json"):
            if json.loads(spec.read_text())["name"] == name:
                return json.loads((spec.parent / f"{model}.task.json").read_text())
    raise AssertionError(f"no job {name}")


# -- pure parts --------------------------------------------------------------------------------------
def test_fairness_gives_groups_equal_tokens_whatever_their_answer_length_and_task_count() -> None:
    fair = Fairness()
    shares = [Share("a1", "a", 0), Share("b1", "b", 0)] + [Share(f"c{i}", "c", 0) for i in range(5)]
    cost = {"a": 4, "b": 40, "c": 8}  # team b asks for answers 10x longer than team a
    tokens = {"a": 0, "b": 0, "c": 0}
    in_flight: list[tuple[Share, int]] = []
    for i in range(6000):
        share = fair.choose(shares)
        fair.fed(share, i)
        in_flight.append((share, i))
        if len(in_flight) > 8:  # the engine's window: the oldest line finishes
            done, index = in_flight.pop(0)
            fair.finished(done, index, cost[done.group])
            tokens[done.group] += cost[done.group]
    assert max(tokens.values()) / min(tokens.values()) < 1.1, tokens
    per_c = [s.finished_tokens for s in shares if s.group == "c"]
    assert max(per_c) / min(per_c) < 1.1, per_c  # the five tasks of c share its turn


def test_fairness_is_strict_between_priorities() -> None:
    fair = Fairness()
    low, high = Share("low", "a", 0), Share("high", "b", 5)
    picks = [fair.choose([low, high]).key for _ in range(50)]
    assert set(picks) == {"high"}


def key(priority: int, t: float, job: str, model: str) -> tuple[str, str, str]:
    return queue_key(priority, int(t * 1e9), job, model), job, model


def test_admission_rules() -> None:
    held = [Held(key(0, 1, "j1", "m")[0], "j1/m", "x"), Held(key(0, 2, "j2", "m")[0], "j2/m", "x")]
    common = dict(max_delay=600, preempt_after=None, loaded_for=0, runnable={"m", "n"}, now=100)
    q = [key(0, 3, "j3", "m")]
    assert admission(q, held, "m", {q[0][0]: "x"}, max_shared=8, **common).admit.job_id == "j3"
    full = admission(q, held, "m", {q[0][0]: "x"}, max_shared=2, **common)
    assert full.admit is None and full.evict is None  # same priority, same group: it waits
    q = [key(5, 3, "j3", "m")]
    assert admission(q, held, "m", {q[0][0]: "x"}, max_shared=2, **common).evict == "j2/m"  # lowest, newest
    q = [key(0, 3, "j3", "m")]
    other_group = admission(q, held, "m", {q[0][0]: "y"}, max_shared=2, **common)
    assert other_group.evict == "j2/m" and "no running task" in other_group.reason
    q = [key(5, 3, "j3", "n")]  # another model of a higher priority
    assert admission(q, held, "m", {}, max_shared=8, **{**common, "preempt_after": 0}).preempt
    assert not admission(q, held, "m", {}, max_shared=8, **{**common, "preempt_after": 300}).preempt
    assert not admission(
        q, held, "m", {}, max_shared=8, **{**common, "preempt_after": 0, "runnable": {"m"}}
    ).preempt
    q = [key(0, 3, "j3", "n"), key(0, 4, "j4", "m")]  # equal priority, waited past max_swap_delay
    waited = admission(q, held, "m", {}, max_shared=8, **{**common, "max_delay": 50})
    assert waited.admit is None and "takes no new task" in waited.reason


def test_metrics_name_at_most_50_groups_and_fold_the_rest_into_other() -> None:
    from dropbox_runner.api.metrics import _by_group

    def row(group: str, tokens: int) -> dict:
        usage = {"prompt_tokens": 1, "completion_tokens": tokens}
        return {"model": "m", "group": group, "succeeded": 1, "failed": 0, "usage": usage, "preemptions": 1}

    doc = {"jobs": [{"models": [row(f"team{i}", 100 + i)]} for i in range(60)]}
    families = {f.name: f for f in _by_group(doc)}
    groups = {s.labels["group"] for s in families["dropbox_runner_group_requests"].samples}
    assert len(groups) == 51 and "other" in groups and "team59" in groups and "team0" not in groups
    other = [s.value for s in families["dropbox_runner_preemptions"].samples if s.labels["group"] == "other"]
    assert other == [10]


def test_history_keeps_a_series_per_running_task(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from dropbox_runner.status.history import History

    clock = iter(range(0, 1000, 10))
    history = History(
        SimpleNamespace(history=tmp_path / "history.json"), ticker=lambda: next(clock), every=10
    )
    history.task_progress("j1/m", "a", 5, 50)
    history.task_progress("j2/m", "b", 1, 4)
    history.tick()
    history.task_ended("j1/m")
    history.task_progress("j2/m", "b", 3, 12)
    history.tick()
    history.task_ended("j2/m")
    history.tick()
    points = json.loads((tmp_path / "history.json").read_text())["points"]
    assert points[0]["tasks"] == {
        "j1/m": {"group": "a", "requests": 5, "tokens": 50},
        "j2/m": {"group": "b", "requests": 1, "tokens": 4},
    }
    assert points[1]["tasks"] == {"j2/m": {"group": "b", "requests": 3, "tokens": 12}}
    assert "tasks" not in points[2]


# -- the daemon ----------------------------------------------------------------------------------------
def test_two_jobs_share_one_process_a_third_joins_and_each_gets_its_own_answers(
    root: Path, daemon, tmp_path: Path
) -> None:
    configure(root)
    drop(root, "held", "a", 1000)
    drop(root, "held", "b", 1000, max_tokens=3)
    d = daemon()
    wait_for(lambda: len(running(root)) == 2, timeout=60, what="two tasks in the process")
    drop(root, "held", "c", 600)
    wait_for(lambda: len(running(root)) == 3, timeout=60, what="a third task joining")
    rows = wait_for(lambda: shares(root), timeout=60, interval=0.5, what="status --json with shares")
    assert {r["group"] for r in rows} == {getpass.getuser()}  # no team: the owner of the dropped file
    assert abs(sum(r["share"] for r in rows) - 1) < 0.05, rows
    assert all(r["eta_seconds"] is not None and r["preemptions"] == 0 for r in rows)
    wait_for(lambda: all(finished(root, n) for n in "abc"), timeout=120)
    stop(d)
    log = d.output()
    assert log.count("loading held") == 1, log
    assert "sharing with 2 other tasks" in log
    alone = tmp_path / "alone"  # the same files, one task at a time
    alone.mkdir()
    configure(alone, slots=1)
    drop(alone, "held", "a", 1000)
    drop(alone, "held", "b", 1000, max_tokens=3)
    drop(alone, "held", "c", 600)
    run_once(alone)
    for name in "abc":
        assert batch_json(root, name)["status"] == "completed"
        assert choices(root, name, "held") == choices(alone, name, "held")


def test_run_once_ends_after_every_shared_task(root: Path) -> None:
    configure(root, delay=20)
    for name in "xyz":
        drop(root, "held", name, 150)
    proc = run_once(root)
    assert "sharing with" in proc.stderr
    for name in "xyz":
        assert [x["custom_id"] for x in read_jsonl(root / f"outbox/{name}/held.jsonl")] == [
            f"q-{i}" for i in range(150)
        ]


def test_full_slots_a_higher_priority_or_a_group_without_a_task_takes_one(root: Path, daemon) -> None:
    configure(root, slots=2, delay=20)
    drop(root, "held", "a", 2500, {"metadata": {"team": "x"}})
    drop(root, "held", "b", 2500, {"metadata": {"team": "x"}})
    d = daemon()
    wait_for(lambda: len(running(root)) == 2, timeout=60, what="two tasks running")
    drop(root, "held", "c", 40, {"metadata": {"team": "y"}})  # a group with no running task
    wait_for(lambda: finished(root, "c"), timeout=60)
    drop(root, "held", "p", 40, {"priority": 5, "metadata": {"team": "x"}})
    wait_for(lambda: finished(root, "p"), timeout=60)
    assert not finished(root, "a") and not finished(root, "b")
    wait_for(lambda: all(finished(root, n) for n in "ab"), timeout=180)
    stop(d)
    log = d.output()
    assert "group y has no running task and group x holds 2" in log, log
    assert "has a higher priority than" in log, log
    assert "gives up its slot" in log
    for name, n in (("a", 2500), ("b", 2500), ("c", 40), ("p", 40)):
        assert [x["custom_id"] for x in read_jsonl(root / f"outbox/{name}/held.jsonl")] == [
            f"q-{i}" for i in range(n)
        ]
    preempted = sum(task_record(root, n, "held")["preemptions"] for n in "ab")
    assert preempted >= 2


def test_groups_get_equal_completion_tokens_and_long_answers_buy_nothing(root: Path, daemon) -> None:
    configure(root, delay=20)
    long_prompt = " ".join(["word"] * 60)
    drop(root, "held", "a", 4000, {"metadata": {"team": "a"}}, text=long_prompt, max_tokens=4)
    drop(root, "held", "b", 4000, {"metadata": {"team": "b"}}, text=long_prompt, max_tokens=40)
    for i in range(5):
        drop(root, "held", f"c{i}", 4000, {"metadata": {"team": "c"}}, text=long_prompt, max_tokens=8)
    names = ["a", "b"] + [f"c{i}" for i in range(5)]
    d = daemon()
    wait_for(lambda: len(running(root)) == 7, timeout=90, what="seven tasks sharing")
    time.sleep(1)  # past the first estimates
    before = {n: marker(root, n, "held")["completion_tokens"] for n in names}
    wait_for(lambda: marker(root, "a", "held")["completion_tokens"] - before["a"] >= 3000, timeout=120)
    after = {n: marker(root, n, "held")["completion_tokens"] for n in names}
    stop(d)
    gained = {n: after[n] - before[n] for n in names}
    team = {"a": gained["a"], "b": gained["b"], "c": sum(gained[f"c{i}"] for i in range(5))}
    assert max(team.values()) / min(team.values()) < 1.35, team
    assert not any(finished(root, n) for n in names)


def test_strict_priority_between_shared_tasks(root: Path, daemon) -> None:
    configure(root)
    drop(root, "held", "low", 2000)
    d = daemon()
    wait_for(lambda: marker(root, "low", "held")["count"] > 20, timeout=60, what="low running")
    drop(root, "held", "high", 200, {"priority": 5})
    wait_for(lambda: len(running(root)) == 2, timeout=60, what="high sharing")
    at_start = marker(root, "low", "held")["count"]
    wait_for(lambda: finished(root, "high"), timeout=120)
    during = marker(root, "low", "held")["count"] - at_start
    stop(d)
    assert during <= 40, during  # only what was in flight or staged when high joined


def test_cancel_of_one_sharing_task_leaves_the_others(root: Path, daemon) -> None:
    configure(root)
    write_jsonl(root / "inbox/held/a.jsonl", gated_job(2000))  # cannot end before its cancel
    drop(root, "held", "b", 200)
    d = daemon()
    wait_for(lambda: len(running(root)) == 2, timeout=60, what="two tasks running")
    env_root = ["--root", str(root)]
    subprocess.run([sys.executable, "-m", "dropbox_runner", "cancel", "a", *env_root], check=True, timeout=60)
    wait_for(lambda: finished(root, "a"), timeout=60)
    wait_for(lambda: finished(root, "b"), timeout=120)
    stop(d)
    assert batch_json(root, "a")["status"] == "cancelled"
    assert batch_json(root, "b")["status"] == "completed"
    assert [x["custom_id"] for x in read_jsonl(root / "outbox/b/held.jsonl")] == [
        f"q-{i}" for i in range(200)
    ]


def test_preemption_for_another_model_resumes_losing_and_repeating_nothing(root: Path, daemon) -> None:
    configure(root, preempt="0")
    drop(root, "held", "big", 1500)
    d = daemon()
    wait_for(lambda: marker(root, "big", "held")["count"] > 50, timeout=60, what="big running")
    drop(root, "other", "urgent", 50, {"priority": 5})
    wait_for(lambda: finished(root, "urgent"), timeout=60)
    assert batch_json(root, "big")["status"] == "in_progress"  # preempted, not requeued as new
    wait_for(lambda: finished(root, "big"), timeout=180)
    stop(d)
    log = d.output()
    assert "preempts batch_" in log and "has a higher priority than every running task" in log, log
    assert [x["custom_id"] for x in read_jsonl(root / "outbox/big/held.jsonl")] == [
        f"q-{i}" for i in range(1500)
    ]
    assert task_record(root, "big", "held")["preemptions"] == 1
    m = marker(root, "big", "held")
    assert m["count"] == 1500 and m["completion_tokens"] == sum(
        x["response"]["body"]["usage"]["completion_tokens"]
        for x in read_jsonl(root / "outbox/big/held.jsonl")
    )


def test_max_swap_delay_ends_a_share_for_an_equal_priority_task_of_another_model(root: Path, daemon) -> None:
    configure(root, preempt="0", swap=1)
    drop(root, "held", "big", 3000)
    d = daemon()
    wait_for(lambda: marker(root, "big", "held")["count"] > 50, timeout=60, what="big running")
    drop(root, "other", "next", 20)
    wait_for(lambda: finished(root, "next"), timeout=60)
    assert not finished(root, "big")
    stop(d)
    assert "has waited" in d.output()


def test_kill_9_with_three_tasks_sharing_gives_the_uninterrupted_outboxes(
    root: Path, daemon, tmp_path: Path
) -> None:
    configure(root, delay=10)
    names = ["k1", "k2", "k3"]
    for i, name in enumerate(names):
        drop(root, "held", name, 600, max_tokens=2 + i)
    for _ in range(3):
        d = daemon()
        wait_for(lambda: len(running(root)) == 3 or all(finished(root, n) for n in names), timeout=60)
        time.sleep(0.3)
        d.kill(signal.SIGKILL)
    run_once(root)
    clean = tmp_path / "clean"
    clean.mkdir()
    configure(clean, delay=0)
    for i, name in enumerate(names):
        drop(clean, "held", name, 600, max_tokens=2 + i)
    run_once(clean)
    for name in names:
        assert choices(root, name, "held") == choices(clean, name, "held")


def test_a_poison_line_among_three_sharing_tasks_fails_alone(root: Path) -> None:
    configure(root)
    for name in ("p1", "p2"):
        drop(root, "crashy", name, 60)
    lines = [chat_line(i) for i in range(60)]
    lines[30] = chat_line(30, text="POISON here")
    write_jsonl(root / "inbox/crashy/bad.jsonl", lines)
    said = run_once(root, timeout=240).stderr
    out = read_jsonl(root / "outbox/bad/crashy.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(60)]
    assert out[30]["error"]["code"] == "engine_crash"
    assert all(x["error"] is None for i, x in enumerate(out) if i != 30)
    for name in ("p1", "p2"):
        assert batch_json(root, name)["status"] == "completed"
        record = task_record(root, name, "crashy")
        assert (record["crashes"], record["poison"], record["hunt"]) == (0, [], [])
    bad = task_record(root, "bad", "crashy")
    assert bad["poison"] == [30] and bad["hunt"] == []
    # its lines were halved (task by task): up to 3 crashes before the hunt, then log2 of its suspects
    found = re.search(rf"culprit hunt of {bad['job_id']}/crashy: (\d+) suspect lines", said)
    assert found, said[-3000:]
    assert said.count("loading crashy") <= 4 + math.ceil(math.log2(int(found.group(1)))), said[-3000:]


def test_a_group_that_joins_late_starts_level_and_gets_no_burst() -> None:
    fair = Fairness()
    first, late = Share("a1", "a", 0), Share("b1", "b", 0)
    for i in range(1000):  # the first task ran alone for a while
        fair.fed(fair.choose([first]), i)
        fair.finished(first, i, 10)
    picks = []
    for i in range(20):
        picks.append(fair.choose([first, late]))
        fair.fed(picks[-1], 2000 + i)
        fair.finished(picks[-1], 2000 + i, 10)
    assert 8 <= sum(s is late for s in picks) <= 12  # turns alternate from the start


def test_one_feed_ahead_thread_serves_every_task_within_one_budget(tmp_path: Path) -> None:
    import threading

    from dropbox_runner import protocol as p
    from dropbox_runner.engine.feedahead import FeedAhead

    class Tokenizer:  # a fast tokenizer used from two threads at once raises "Already borrowed"
        def __init__(self) -> None:
            self.threads: set[str] = set()
            self.busy = threading.Lock()
            self.gate = threading.Event()  # nothing is prepared until every task is added

        def apply_chat_template(self, messages, **kw) -> str:
            return messages[-1]["content"]

        def encode(self, text: str, **kw) -> list[int]:
            self.gate.wait(30)
            if not self.busy.acquire(blocking=False):
                raise RuntimeError("Already borrowed")
            try:
                self.threads.add(threading.current_thread().name)
                return [len(w) for w in text.split()]
            finally:
                self.busy.release()

    tok = Tokenizer()
    ahead = FeedAhead(tok, limit=90)
    orders = []
    for t in range(3):
        path = write_jsonl(
            tmp_path / f"in{t}.jsonl", [chat_line(i, f"task {t} line {i}") for i in range(200)]
        )
        order = p.TaskOrder(
            job_id=f"j{t}", model="m", input=str(path), log="", total=200, defaults=[], commit_interval_ms=50
        )
        orders.append(order)
        ahead.add(order)
    tok.gate.set()  # the budget is split three ways before the thread prepares a line
    wait_for(
        lambda: all(len(ahead.sources[o.task_id].cache) == 30 for o in orders),
        timeout=30,
        what="each task's part",
    )
    assert tok.threads == {"feed-ahead"}
    assert ahead.take("j1/m", 0) == [[4, 1, 4, 1]]  # "task 1 line 0"
    ahead.remove("j0/m")  # a task that ends frees its part of the budget for the others
    wait_for(
        lambda: all(len(ahead.sources[o.task_id].cache) == 45 for o in orders[1:]), timeout=30, what="halves"
    )
    ahead.stop()


def test_events_split_over_many_reads_come_out_whole_and_in_order() -> None:
    """The supervisor splits its buffer once per complete event, not at every 64 KiB read."""
    import os
    import threading

    from dropbox_runner import protocol as p
    from dropbox_runner.slot.supervisor import ModelProcess

    big = p.Results([[i, True, 1, 2, 0, "x" * 200] for i in range(5000)], "j/m")  # about 1.2 MB
    small = p.Progress(1, 0, 2, None, None, "j/m")
    data = big.encode() + small.encode() + big.encode()
    r, w = os.pipe()
    proc = object.__new__(ModelProcess)
    proc._events, proc._buffer, proc._newline, proc.trials = (
        os.fdopen(r, "rb", buffering=0),
        bytearray(),
        False,
        {},
    )
    proc.name, proc.loaded, proc.last_event_at = "m", True, 0.0

    def write() -> None:
        for start in range(0, len(data), 10_000):  # odd pieces: events end in the middle of reads
            os.write(w, data[start : start + 10_000])
        os.close(w)

    threading.Thread(target=write).start()
    got: list = []
    while proc._read(5.0):
        got += proc._complete_events()
    assert [type(e) for e in got] == [p.Results, p.Progress, p.Results]
    assert got[0] == big and got[1] == small and got[2] == big
