"""Crash points and clocks (issue 23): webhook events journaled before the final batch.json, control
requests removed only once carried out, cancel and expiry, retry and retention.

Most tests drive the daemon's own parts in-process, so a crash can be injected between two steps
(an exception no boundary catches, as a kill would stop it there); recovery is a new daemon's.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dropbox_runner.intake.scanner import Drop
from dropbox_runner.jobs.operations import request
from dropbox_runner.layout import Layout
from dropbox_runner.queue.journal import Journal
from dropbox_runner.results import batchfile, webhooks

from helpers import batch_json, chat_line, core_for, models_yaml, run_once, take, wait_for, write_jsonl
from servers import free_port

FINAL = ("completed", "failed", "cancelled", "expired")


class Crash(BaseException):
    """The daemon dies here: no `except Exception` boundary catches it."""


def die(*args, **kwargs):
    raise Crash


def hooks_yaml(root: Path, events: str = "") -> None:
    secret = "whsec_" + __import__("base64").b64encode(b"0123456789abcdef0123456789abcdef").decode()
    url = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens: events stay in the journal
    extra = f", events: [{events}]" if events else ""
    models_yaml(root, settings={"webhooks": f"[{{url: '{url}', secret: '{secret}'{extra}}}]"})


def events(root: Path) -> list[dict]:
    return [json.loads(p.read_text())["event"] for p in sorted((root / "state/webhooks").glob("evt_*.json"))]


def crash_after_final_batch_json(monkeypatch: pytest.MonkeyPatch) -> None:
    real = batchfile.write_json

    def write_then_die(path: Path, obj, **kwargs) -> None:
        real(path, obj, **kwargs)
        if path.name == "batch.json" and obj["status"] in FINAL:
            raise Crash

    monkeypatch.setattr(batchfile, "write_json", write_then_die)


# -- item 4: the event is journaled before the final batch.json is visible --------------------------
def test_a_crash_right_after_a_final_batch_json_keeps_its_event_and_recovery_replays_the_same(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks_yaml(root)
    core = core_for(root)
    spec = take(core, "echo/a.jsonl", [chat_line(0)])
    crash_after_final_batch_json(monkeypatch)
    with pytest.raises(Crash):
        core.jobs.cancelled(spec)
    assert batch_json(root, "a")["status"] == "cancelled"
    before = events(root)
    assert [e["type"] for e in before] == ["batch.cancelled"], "the final batch.json came before its event"
    monkeypatch.undo()
    core_for(root)._recover()
    assert events(root) == before, "a replay is the same event, journaled once"
    assert (root / "state/archive" / spec.id).is_dir()


def test_a_crash_right_after_a_rejected_drops_batch_json_keeps_its_event(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks_yaml(root)
    core = core_for(root)
    write_jsonl(root / "inbox/echo/bad.jsonl", ["not json"])
    crash_after_final_batch_json(monkeypatch)
    with pytest.raises(Crash):
        core.claimer.claim(Drop(root / "inbox/echo/bad.jsonl", "echo", None))
    assert batch_json(root, "bad")["status"] == "failed"
    before = events(root)
    assert [e["type"] for e in before] == ["batch.failed"]
    monkeypatch.undo()
    core_for(root)._recover()  # the claim is finished again: same job, same event
    assert events(root) == before
    assert (root / "state/archive" / batch_json(root, "bad")["id"]).is_dir()


def test_a_full_disk_while_journaling_an_event_is_retried_after_the_pause_not_lost(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks_yaml(root)
    core = core_for(root)
    spec = take(core, "echo/full.jsonl", [chat_line(0)])

    def full(path: Path, *args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(webhooks, "write_json", full)
    with pytest.raises(OSError):
        core.jobs.cancelled(spec)
    assert events(root) == []
    assert batch_json(root, "full")["status"] != "cancelled", "no final batch.json without its event"
    monkeypatch.undo()
    core._recover()  # what the daemon does when its pause ends
    assert [e["type"] for e in events(root)] == ["batch.cancelled"]
    assert batch_json(root, "full")["status"] == "cancelled"


# -- item 13: no receiver, no event ----------------------------------------------------------------
def test_no_event_is_journaled_for_a_type_no_receiver_takes(root: Path) -> None:
    write_jsonl(root / "inbox/echo/ok.jsonl", [chat_line(0)])
    run_once(root, timeout=60)
    assert events(root) == []
    status = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "status", "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert "webhook events" not in status.stdout
    hooks_yaml(root, events="batch.failed")
    write_jsonl(root / "inbox/echo/ok2.jsonl", [chat_line(1)])
    write_jsonl(root / "inbox/echo/bad.jsonl", ["not json"])
    run_once(root, timeout=60)
    assert [e["data"]["name"] for e in events(root)] == ["bad"]


# -- control requests: act, then remove ------------------------------------------------------------
def test_a_cancel_request_is_removed_only_once_carried_out(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = core_for(root)
    spec = take(core, "echo/c.jsonl", [chat_line(0)])
    request(core.journal, "cancel", spec.id)
    monkeypatch.setattr(core.execution, "cancel", die)  # the daemon dies while carrying it out
    with pytest.raises(Crash):
        core._controls()
    assert list((root / "state/control").iterdir()), "the request is still there after the crash"
    again = core_for(root)
    again._recover()
    again._controls()
    assert batch_json(root, "c")["status"] == "cancelled"
    assert not list((root / "state/control").iterdir())


# -- retry: a crash part-way neither re-announces the old state nor loses the retry ---------------
def test_a_crash_between_unarchive_and_requeue_replays_the_same_event_and_then_the_retry(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks_yaml(root)
    core = core_for(root)
    spec = take(core, "echo/r.jsonl", [chat_line(0), chat_line(1)])
    core.jobs.cancelled(spec)
    announced = events(root)
    request(core.journal, "retry", spec.id)
    real = Journal.unarchive
    monkeypatch.setattr(Journal, "unarchive", lambda self, job_id: (real(self, job_id), die()))
    with pytest.raises(Crash):
        core._controls()
    monkeypatch.undo()
    again = core_for(root)
    again._recover()
    assert events(root) == announced, "the old final state is not announced under a new id"
    again._controls()  # the retry request was kept: it is carried out now
    task = again.journal.task(spec.id, "echo")
    assert task.status == "queued" and task.retries == 1
    assert batch_json(root, "r")["status"] == "queued"


def test_a_crash_part_way_through_a_retry_is_finished_at_the_next_start(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = core_for(root)
    spec = take(core, "echo2/s.jsonl", [chat_line(0)], {"models": ["echo", "echo2"]})
    core.jobs.cancelled(spec)
    monkeypatch.setattr(Journal, "enqueue", die)  # after the first task is saved, before the second
    with pytest.raises(Crash):
        core.jobs.retried(spec)
    monkeypatch.undo()
    again = core_for(root)
    again._recover()
    tasks = again.journal.tasks(spec)
    assert [(t.status, t.retries) for t in tasks] == [("queued", 1), ("queued", 1)]
    assert sorted(model for _, _, model in again.journal.queued()) == ["echo", "echo2"]
    assert again.jobs.retried(spec) == [], "a repeated request is a no-op while the retry runs"


# -- cancel and expiry of a running task ------------------------------------------------------------
@pytest.fixture
def running(root: Path):
    """A daemon in-process running a long `paced` task on its real model process."""
    core = core_for(root)
    spec = take(core, "paced/long.jsonl", [chat_line(i) for i in range(20000)], {"completion_window": "1h"})
    assert core._start_next()
    sent = lambda: any(r.sent for r in core.execution.running.values())  # noqa: E731
    wait_for(lambda: (core.execution.pump(0.2), sent())[1], timeout=60, what="the task sent")
    yield core, spec
    if core.execution.proc is not None:
        core.execution.proc.end(5)


def test_an_expiry_just_after_a_users_cancel_leaves_it_cancelled(
    running, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core, spec = running
    request(core.journal, "cancel", spec.id)
    core._controls()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)  # the window ran out meanwhile
    core._expire()
    wait_for(lambda: (core.execution.pump(0.2), not core.execution.running)[1], timeout=60, what="the end")
    assert batch_json(root, "long")["status"] == "cancelled"


def test_a_cancel_carried_out_just_before_a_crash_still_ends_the_task_cancelled(running, root: Path) -> None:
    core, spec = running
    request(core.journal, "cancel", spec.id)
    core._controls()  # the model process was told; the daemon dies before it answers
    os.killpg(core.execution.proc.pid, signal.SIGKILL)
    again = core_for(root)
    again._recover()
    assert batch_json(root, "long")["status"] == "cancelled"
    assert not again.journal.queued(), "it is not run again"


# -- clocks: intervals are monotonic, times in files Unix seconds ---------------------------------
class Clocks:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wall, self.mono = time.time(), 1000.0
        monkeypatch.setattr(time, "time", lambda: self.wall)
        monkeypatch.setattr(time, "monotonic", lambda: self.mono)

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_a_wall_clock_set_back_a_day_does_not_stall_expiry(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clocks = Clocks(monkeypatch)
    core = core_for(root)
    core._expire()
    clocks.wall -= 86400  # someone sets the clock back a day
    take(core, "echo/w.jsonl", [chat_line(0)], {"completion_window": "10s"})
    clocks.run(11)
    core._expire()
    assert batch_json(root, "w")["status"] == "expired"
    assert batch_json(root, "w")["expires_at"] == int(batch_json(root, "w")["created_at"]) + 10


def test_a_wall_clock_set_back_a_day_does_not_stall_retention(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clocks = Clocks(monkeypatch)
    core = core_for(root)
    core.settings.keep_finished_days = 30 / 86400  # 30 seconds
    core._prune()
    clocks.wall -= 86400
    spec = take(core, "echo/p.jsonl", [chat_line(0)])
    core.jobs.cancelled(spec)
    clocks.run(61)
    core._prune()
    assert not (root / "outbox/p").exists() and not (root / "state/archive" / spec.id).exists()


def test_a_wall_clock_set_forward_past_a_deadline_expires_the_job_at_the_next_check(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decision (docs/reliability.md): expires_at is the deadline the user wrote, in Unix seconds;
    # once the wall clock says it has passed, the job expires, however little time the daemon saw.
    clocks = Clocks(monkeypatch)
    core = core_for(root)
    take(core, "echo/f.jsonl", [chat_line(0)], {"completion_window": "1h"})
    clocks.run(2)
    core._expire()
    assert batch_json(root, "f")["status"] != "expired"
    clocks.wall += 3600  # the clock is set forward an hour
    clocks.mono += 2
    core._expire()
    assert batch_json(root, "f")["status"] == "expired"


def test_the_history_keeps_its_cadence_when_the_wall_clock_jumps(tmp_path: Path) -> None:
    from dropbox_runner.status.history import History

    layout = Layout(tmp_path)
    layout.state.mkdir()
    wall, mono = [1000.0], [0.0]
    history = History(layout, clock=lambda: wall[0], every=10, ticker=lambda: mono[0])
    taken = []
    for step, jump in enumerate([0, 0, -3600, 0, 0, 86400, 0]):
        wall[0] += 10 + jump
        mono[0] += 10 if step != 5 else 1  # a jump forward a day, one second after the last point
        taken.append(history.tick())
    assert taken == [True, True, True, True, True, False, True], "set back: no stall; forward: no extra"
    assert [p["t"] for p in history.points][2:4] == [1030.0 - 3600, 1040.0 - 3600], "t stays the wall's"
