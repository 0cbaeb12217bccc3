"""Copies of a model belong to the slot (issue 22 item 4): started once for the model, they serve
every admitted task of it together; a new task does not reload them.

Work is held by the echo engine's pace and gate (the last line of a gated job is answered only once
the gate opens), never by the machine's speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    Daemon,
    answers,
    batch_json,
    chat_line,
    completed,
    expected,
    finished,
    gated_job,
    models_yaml,
    open_gate,
    read_jsonl,
    served_together,
    snapshot,
    tasks_on_copies,
    wait_for,
    write_jsonl,
)


@pytest.fixture
def croot(root: Path) -> Path:
    gate = f"gate_on: GATE, gate_file: {root / 'gate.open'}"
    models = (
        f"  cg: {{engine: echo, replicas: 2, engine_args: {{delay_ms: 10, max_in_flight: 8, {gate}}}}}\n"
        f"  cgslow: {{engine: echo, replicas: 2, engine_args: {{delay_ms: 20, max_in_flight: 8, {gate}}}}}\n"
    )
    models_yaml(root, models=models)
    for name in ("cg", "cgslow"):
        (root / "inbox" / name).mkdir()
    return root


@pytest.fixture
def daemon(croot: Path):
    started: list[Daemon] = []

    def start() -> Daemon:
        started.append(Daemon(croot))
        return started[-1]

    yield start
    for d in started:
        d.end()  # its process group and every process below it, also when the test failed


def daemon_log(root: Path) -> str:
    return (root / "state/daemon.log").read_text(errors="replace")


def copy_loads(root: Path, model: str) -> int:
    return daemon_log(root).count(f" of {model} in ")  # "loaded copy N of MODEL in 0.1s"


def job_ids(root: Path, *names: str) -> dict[str, str]:
    """Job name -> job id, from the status snapshot's running tasks (waits until each runs)."""

    def found() -> dict[str, str] | None:
        ids = {}
        for name in names:
            b = batch_json(root, name)
            if b is None or b["status"] != "in_progress":
                return None
            ids[name] = b["id"]
        return ids

    return wait_for(found, timeout=60, what=f"jobs {names} in progress")


def two_on_the_copies(root: Path, daemon, lines_a: int, lines_b: int) -> tuple[Daemon, dict[str, str]]:
    """Gated jobs a and b on `cg`, a daemon, and the wait until the copies serve both at once."""
    write_jsonl(root / "inbox/cg/a.jsonl", gated_job(lines_a))
    write_jsonl(root / "inbox/cg/b.jsonl", gated_job(lines_b))
    d = daemon()
    ids = job_ids(root, "a", "b")
    wait_for(lambda: served_together(root, list(ids.values())), what="both tasks on the copies")
    return d, ids


def contents(root: Path, name: str, model: str) -> list[tuple]:
    return [(a[0], a[1]) for a in answers(root / f"outbox/{name}/{model}.jsonl")]


def test_two_tasks_share_the_copies_with_one_load_per_copy(croot: Path, daemon) -> None:
    d, ids = two_on_the_copies(croot, daemon, 400, 300)
    open_gate(croot)
    wait_for(lambda: finished(croot, "a") and finished(croot, "b"), timeout=120, what="both jobs")
    loads = copy_loads(croot, "cg")
    # the same jobs alone, on one process of the same engine (after the counting: a swap ends the copies)
    write_jsonl(croot / "inbox/gated/ra.jsonl", gated_job(400))
    write_jsonl(croot / "inbox/gated/rb.jsonl", gated_job(300))
    wait_for(lambda: finished(croot, "ra") and finished(croot, "rb"), timeout=120, what="the lone runs")
    d.kill(signal.SIGTERM)
    assert loads == 2, daemon_log(croot)
    assert daemon_log(croot).count("loading 2 copies of cg") == 1
    assert answers(croot / "outbox/a/cg.jsonl") == answers(croot / "outbox/ra/gated.jsonl")
    assert answers(croot / "outbox/b/cg.jsonl") == answers(croot / "outbox/rb/gated.jsonl")
    assert batch_json(croot, "a")["request_counts"] == batch_json(croot, "ra")["request_counts"]


def test_a_third_task_joins_running_copies(croot: Path, daemon) -> None:
    _, ids = two_on_the_copies(croot, daemon, 200, 200)
    write_jsonl(croot / "inbox/cg/c.jsonl", gated_job(101)[:100])  # no gated line: it can end now
    wait_for(lambda: finished(croot, "c"), timeout=60, what="the third job, beside two held ones")
    assert not finished(croot, "a") and not finished(croot, "b")  # held by the gate: c joined them
    open_gate(croot)
    wait_for(lambda: finished(croot, "a") and finished(croot, "b"), timeout=120, what="the held jobs")
    assert copy_loads(croot, "cg") == 2, daemon_log(croot)  # three tasks, one load per copy
    assert contents(croot, "c", "cg") == [(f"q-{i}", f"echo: question number {i}") for i in range(100)]
    assert contents(croot, "a", "cg") == expected(200) and contents(croot, "b", "cg") == expected(200)


def test_cancel_of_one_task_leaves_the_other_running_on_the_copies(croot: Path, daemon) -> None:
    _, ids = two_on_the_copies(croot, daemon, 300, 300)
    cmd = [sys.executable, "-m", "dropbox_runner", "cancel", "a", "--root", str(croot)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    wait_for(lambda: finished(croot, "a"), timeout=60, what="the cancel")
    assert batch_json(croot, "a")["status"] == "cancelled"
    assert not finished(croot, "b")

    def only_b() -> bool:
        held = set().union(*tasks_on_copies(croot))
        return ids["b"] in held and ids["a"] not in held

    wait_for(only_b, what="b alone on the copies")
    open_gate(croot)
    wait_for(lambda: finished(croot, "b"), timeout=120, what="the other job")
    assert batch_json(croot, "b")["status"] == "completed"
    assert contents(croot, "b", "cg") == expected(300)
    assert copy_loads(croot, "cg") == 2, daemon_log(croot)


def test_a_copy_killed_while_serving_two_tasks_loses_and_repeats_nothing(croot: Path, daemon) -> None:
    n = 5000  # about 800 lines/s on two copies at 20 ms a request, 8 in flight each
    write_jsonl(croot / "inbox/cgslow/a.jsonl", gated_job(n))
    write_jsonl(croot / "inbox/cgslow/b.jsonl", gated_job(n))
    daemon()
    ids = job_ids(croot, "a", "b")

    def both_on_one_copy() -> list | None:
        copies = snapshot(croot).get("copies") or []
        both = [c for c in copies if set(ids.values()) <= {s[0].split("/")[0] for s in c["shards"]}]
        progressed = completed(croot, "a", "cgslow") > 200 and completed(croot, "b", "cgslow") > 200
        return both if both and progressed else None

    victim = wait_for(both_on_one_copy, timeout=120, what="a copy holding shards of both tasks")[0]
    before = {name: completed(croot, name, "cgslow") for name in ("a", "b")}
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: "of cgslow killed by SIGKILL" in daemon_log(croot), what="the copy's death")
    open_gate(croot)
    wait_for(lambda: finished(croot, "a") and finished(croot, "b"), timeout=180, what="both jobs")
    for name in ("a", "b"):
        out = read_jsonl(croot / f"outbox/{name}/cgslow.jsonl")
        assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(n)]  # each line once, in order
        assert all(x["response"]["status_code"] == 200 for x in out)
        counts = batch_json(croot, name)["request_counts"]
        assert counts == {"total": n, "completed": n, "failed": 0} and before[name] <= n
    assert copy_loads(croot, "cgslow") == 3  # two copies, and the one started again after the kill


def test_a_shard_is_leased_only_once_its_lines_are_planned_and_at_most_a_window(tmp_path: Path) -> None:
    """The plan is read by a thread: the loop takes it a part at a time, and a shard goes out only
    once its duplicates are failed (a copy never answers a line the daemon must fail)."""
    import time

    from dropbox_runner import protocol as p
    from dropbox_runner.slot.copies.shards import ShardedTask

    lines = [chat_line(i) for i in range(300)]
    lines[250] = chat_line(3)  # repeats line 3's id
    write_jsonl(tmp_path / "in.jsonl", lines)
    order = p.TaskOrder("j", "m", str(tmp_path / "in.jsonl"), str(tmp_path / "m.log"), 300, [{}], 50)
    task = ShardedTask(order, str(tmp_path), replicas=2)
    try:
        assert task.next_shard(None, alone=False) is None  # nothing planned yet: the loop did not wait
        deadline = time.monotonic() + 60
        while task.take_plan():
            assert time.monotonic() < deadline, "the plan did not end"
            time.sleep(0.01)
        assert task.log.done[250] and task.answered == 1  # failed in place, as one copy would
        first = task.next_shard(8, alone=False)
        assert (first.start, first.end) == (0, 8)  # while tasks share: one window at most
        rest = [task.next_shard(None, alone=False) for _ in range(12)]
        assert [(s.start, s.end) for s in rest if s] == [(8, 38)] + [
            (s, min(s + 38, 250)) for s in range(38, 250, 38)
        ] + [(251, 289), (289, 300)]
    finally:
        task.close()


def test_copies_are_preempted_like_one_process_and_resume_losing_nothing(croot: Path, daemon) -> None:
    yaml = croot / "models.yaml"
    settings = "settings:\n  preempt_after_seconds: 0\n  stop_timeout_seconds: 2\n"
    yaml.write_text(yaml.read_text().replace("settings:\n", settings, 1))
    write_jsonl(croot / "inbox/cg/big.jsonl", gated_job(600))
    d = daemon()
    wait_for(lambda: completed(croot, "big", "cg") > 50, timeout=60, what="big running on the copies")
    (croot / "inbox/echo/urgent.manifest.json").write_text('{"priority": 5}')
    write_jsonl(croot / "inbox/echo/urgent.jsonl", [chat_line(i) for i in range(50)])
    wait_for(lambda: finished(croot, "urgent"), timeout=60, what="the urgent job")
    assert batch_json(croot, "big")["status"] == "in_progress"  # preempted, back in line
    open_gate(croot)
    wait_for(lambda: finished(croot, "big"), timeout=120, what="big, resumed on the copies")
    d.kill(signal.SIGTERM)
    assert "preempts batch_" in daemon_log(croot)
    assert contents(croot, "big", "cg") == expected(600)
    assert batch_json(croot, "big")["request_counts"]["completed"] == 600
    assert daemon_log(croot).count("loading 2 copies of cg") == 2  # ended for the urgent job, then again


def test_the_feed_ahead_of_a_copy_reads_its_shard_from_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Shards are a window while tasks share, so a copy gets many: each is read from the checkpoint
    before it, not from the input's first line."""
    from dropbox_runner import protocol as p
    from dropbox_runner.engine import feedahead
    from dropbox_runner.lines.parse import iter_raw_lines

    read: list[int] = []

    def counted(*args):
        for raw in iter_raw_lines(*args):
            read.append(raw.index)
            yield raw

    class Tokenizer:
        def apply_chat_template(self, messages, **kw) -> str:
            return messages[-1]["content"]

        def encode(self, text: str, **kw) -> list[int]:
            return [len(w) for w in text.split()]

    monkeypatch.setattr(feedahead, "iter_raw_lines", counted)
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(1000)])
    offset = sum(len(x) + 1 for x in path.read_bytes().split(b"\n")[:896])  # line 896's checkpoint
    order = p.TaskOrder(
        "j",
        "m",
        str(path),
        "",
        1000,
        [],
        50,
        shard=[900, 916],
        shard_at=[offset, 897, 896],
        task_id="j/m@900",
    )
    ahead = feedahead.FeedAhead(Tokenizer())
    try:
        ahead.add(order)
        wait_for(lambda: ahead.sources["j/m@900"].done, timeout=30, what="the shard prepared")
        assert sorted(ahead.sources["j/m@900"].cache) == list(range(900, 916))
        assert min(read) == 896 and len(read) <= 21  # from the checkpoint to just past the shard
    finally:
        ahead.stop()
