"""The culprit hunt by halving (issue 22 item 5): the decisions of slot/crashes.py over records, and
the daemon finding a poison line among many suspects in about log2(S) restarts, across a restart of
the daemon too. The poison line crashes the echo engine in a step, with the rest of its window in
flight, as a GPU fault does (`crash_in_step`); work is held by its pace, never the machine's speed.
"""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest

from dropbox_runner.queue.journal import TaskRecord
from dropbox_runner.slot.crashes import (
    MAX_CRASHES_WITHOUT_CULPRIT,
    after_crash,
    after_shard_crash,
    halves,
    shared_crash,
    suspects,
)

from helpers import batch_json, chat_line, models_yaml, read_jsonl, run_once, wait_for, write_jsonl


def record(**fields) -> TaskRecord:
    return TaskRecord(job_id="j", model="m", queue_key="k", **fields)


# -- the decisions -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("suspect_lines", "parts"),
    [
        ([], []),
        ([7], [[7, 7]]),
        ([1, 2], [[1, 1], [2, 2]]),
        ([1, 2, 3], [[1, 2], [3, 3]]),
        ([3, 5, 9, 10], [[3, 5], [9, 9], [10, 10]]),  # lines with a result between are not counted
        (list(range(64)), [[0, 31], [32, 47], [48, 55], [56, 59], [60, 61], [62, 62], [63, 63]]),
    ],
)
def test_halves_runs_the_first_half_then_halves_the_rest(suspect_lines: list[int], parts: list) -> None:
    assert halves(suspect_lines) == parts


CASES = [  # (record before, trial, first_missing, fed) -> (hunt, poison, narrowings, suspect_until, note)
    ({}, None, 10, 40, ([], [], 0, 40, "restarting at full speed")),
    ({"suspect_until": 40, "crashes": 1}, None, 12, 45, ([12, 40], [], 0, 45, "halving them")),
    ({"suspect_until": 40, "crashes": 1}, None, 41, 60, ([], [], 0, 60, "restarting at full speed")),
    ({"suspect_until": 40, "hunt": [12, 40]}, list(range(12, 28)), 12, 27, ([12, 27], [], 1, 40, "halving")),
    ({"suspect_until": 40, "hunt": [12, 27]}, [20], 12, 20, ([], [20], 0, 40, "fails with engine_crash")),
    ({"suspect_until": 40, "hunt": [12, 40]}, [], 20, 27, ([12, 40], [], 0, 40, "it goes on")),
    ({"suspect_until": 40, "hunt": [12, 40]}, None, 12, 12, ([12, 40], [], 0, 40, "it goes on")),
]


@pytest.mark.parametrize(("before", "trial", "first_missing", "fed", "after"), CASES)
def test_after_crash(before: dict, trial, first_missing: int, fed: int, after: tuple) -> None:
    task = record(**before)
    verdict = after_crash(task, trial, first_missing, fed, "killed by SIGKILL")
    hunt, poison, narrowings, suspect_until, note = after
    assert (task.hunt, task.poison, task.narrowings, task.suspect_until) == (
        hunt,
        poison,
        narrowings,
        suspect_until,
    )
    assert task.crashes == before.get("crashes", 0) + 1
    assert note in verdict.note and not verdict.give_up


def test_crashes_that_find_nothing_give_up_but_narrowing_ones_do_not() -> None:
    blind = record(crashes=MAX_CRASHES_WITHOUT_CULPRIT, suspect_until=5)
    assert after_crash(blind, None, 10, 20, "killed").give_up
    deep = record(crashes=MAX_CRASHES_WITHOUT_CULPRIT + 3, narrowings=3, hunt=[0, 511])
    assert not after_crash(deep, list(range(256)), 0, 255, "killed").give_up  # a 4th narrowing
    assert after_crash(deep, [], 0, 255, "killed").give_up  # then one that narrows nothing


def hunt(size: int, poison: int | None) -> tuple[TaskRecord, int, int]:
    """Run the daemon's hunt over lines 0..size-1 with the pure decisions, as the model process and
    failures.py do: parts in turn, a part ending clean is cleared, a part holding `poison` crashes.
    Returns the record, the crashes and the parts run."""
    task = record(hunt=[0, size - 1], suspect_until=size - 1, crashes=2)
    cleared: set[int] = set()
    crashes = parts_run = 0
    while task.hunt:
        left = [i for i in range(task.hunt[0], task.hunt[1] + 1) if i not in cleared]
        for first, last in halves(left):
            part = [i for i in left if first <= i <= last]
            parts_run += 1
            if poison in part:
                assert not after_crash(task, part, part[0], last, "killed").give_up
                crashes += 1
                break
            cleared.update(part)
        else:
            task.hunt = []  # the process said the hunt is over (failures.py clears it)
    return task, crashes, parts_run


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100, 512])
def test_a_hunt_finds_any_poison_line_in_log2_crashes(size: int) -> None:
    bound = math.ceil(math.log2(size)) if size > 1 else 1
    for poison in range(size):
        task, crashes, parts_run = hunt(size, poison)
        assert task.poison == [poison] and task.hunt == []
        assert crashes <= bound and parts_run <= bound + 1, (poison, crashes, parts_run)
    task, crashes, _ = hunt(size, None)  # crashes that were no line's doing: every part ends clean
    assert task.poison == [] and crashes == 0


def test_suspects_are_the_hunting_task_else_the_tasks_with_uncommitted_lines_in_flight() -> None:
    marks = {"a": (10, 20), "b": (5, 4), "c": (0, 0)}
    assert suspects(marks, None) == ["a", "c"]
    assert suspects(marks, "b") == ["b"]


def test_a_second_shared_crash_gives_a_hunt_to_each_task_still_holding_its_lines() -> None:
    last: dict[str, int] = {}
    note, hunts = shared_crash(["a", "b"], {"a": (10, 20), "b": (3, 9)}, last)
    assert hunts == {} and "full speed" in note and last == {"a": 20, "b": 9}
    # b's lines up to 9 have results since; a's from 12 to 20 still not, and c is new
    note, hunts = shared_crash(["a", "b", "c"], {"a": (12, 25), "b": (10, 14), "c": (0, 3)}, last)
    assert hunts == {"a": [12, 20]} and "a halve their lines" in note
    assert last == {"a": 25, "b": 14, "c": 3}


def test_a_shard_that_kills_two_copies_is_split() -> None:
    assert [after_shard_crash(1, False), after_shard_crash(2, False), after_shard_crash(2, True)] == [
        "again",
        "split",
        "poison",
    ]


# -- the daemon --------------------------------------------------------------------------------------
POISON_AT = 20
DEADLY = (
    "  deadly: {engine: echo, engine_args: {crash_on: POISON, crash_in_step: true, "
    "max_in_flight: 64, delay_ms: 1000}}\n"
)


def deadly_root(root: Path, lines: int = 100) -> None:
    """Lines 0-63 are fed at once, each due a second later: the poison line crashes the process while
    the lines before it and after it are in flight, and (commits every 10 s) none has a result."""
    models_yaml(root, replace={"commit_interval_ms: 50": "commit_interval_ms: 10000"}, models=DEADLY)
    body = [chat_line(i, text="POISON" if i == POISON_AT else None) for i in range(lines)]
    write_jsonl(root / "inbox/deadly/d.jsonl", body)


def task_record(root: Path, model: str) -> dict:
    return json.loads(next((root / "state").glob(f"*/*/{model}.task.json")).read_text())


def assert_poison_failed_alone(root: Path, lines: int = 100) -> None:
    out = read_jsonl(root / "outbox/d/deadly.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(lines)]  # each line once, in order
    assert out[POISON_AT]["error"]["code"] == "engine_crash"
    assert all(x["response"]["status_code"] == 200 for i, x in enumerate(out) if i != POISON_AT)
    assert batch_json(root, "d")["request_counts"] == {"total": lines, "completed": lines - 1, "failed": 1}
    done = task_record(root, "deadly")
    assert done["poison"] == [POISON_AT] and done["hunt"] == []


def hunt_size(said: str) -> int:
    return int(re.search(r"culprit hunt of \S+: (\d+) suspect lines", said).group(1))


def test_a_poison_line_among_many_suspects_is_found_in_log2_restarts(root: Path) -> None:
    deadly_root(root)
    said = run_once(root, timeout=240).stderr
    assert_poison_failed_alone(root)
    size = hunt_size(said)  # the lines in flight at both crashes (64 unless feeding took over 1 s)
    assert size > POISON_AT
    starts, parts = (
        said.count("loading deadly"),
        len(re.findall(r"culprit hunt of \S+: lines \d+-\d+ run", said)),
    )
    # one line at a time would run up to `size` parts; halving: log2(size), and each part at full speed
    assert starts <= 3 + math.ceil(math.log2(size)), said[-3000:]
    assert parts <= 2 + math.ceil(math.log2(size)), said[-3000:]
    assert task_record(root, "deadly")["crashes"] == starts - 1


def test_a_hunt_survives_a_kill_9_of_the_daemon(root: Path, daemon) -> None:
    deadly_root(root)
    d = daemon(root)
    try:  # the first part of the hunt runs: its record holds the hunt
        wait_for(lambda: "run alone" in d.output(), timeout=120, what="the hunt's first part")
        hunted = wait_for(lambda: task_record(root, "deadly")["hunt"], what="the hunt in the record")
        d.kill(signal.SIGKILL)
    finally:
        d.kill(signal.SIGTERM)
    assert hunted and hunted[0] <= POISON_AT <= hunted[1]
    said = run_once(root, timeout=240).stderr
    assert_poison_failed_alone(root)
    # the restarted daemon goes on with the hunt: no crash at full speed first
    assert said.index("culprit hunt of") < said.index("killed by SIGKILL")
