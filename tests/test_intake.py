"""Intake: only complete regular files are taken, exactly once, whatever way they arrive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from dropbox_runner.config import Settings
from dropbox_runner.intake.scanner import Scanner
from dropbox_runner.intake.watcher import filesystem_type, should_poll

from helpers import batch_json, chat_line, finished, read_jsonl, run_once, wait_for, write_jsonl


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_scanner(inbox: Path, **settings) -> tuple[Scanner, Clock]:
    clock = Clock()
    return Scanner(inbox, Settings(settle_seconds=2, **settings), ["echo"], clock), clock


def test_settle_rule_waits_for_size_and_mtime_to_hold(tmp_path: Path) -> None:
    (tmp_path / "echo").mkdir()
    scanner, clock = make_scanner(tmp_path)
    f = tmp_path / "echo/a.jsonl"
    f.write_text("x\n")
    assert scanner.scan() == [] and scanner.pending == 1
    clock.t += 1.9
    with open(f, "a") as fh:  # the writer goes on before the settle time ran out
        fh.write("y\n")
    assert scanner.scan() == []
    clock.t += 1.9
    assert scanner.scan() == [], "the settle time restarts at each change"
    clock.t += 0.2
    assert [d.path for d in scanner.scan()] == [f]


def test_ignored_names_and_non_regular_files(tmp_path: Path) -> None:
    (tmp_path / "echo").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_text("{}\n")
    names = [
        ".a.jsonl.XyZ123",
        "b.jsonl.tmp",
        "c.jsonl.part",
        "d.partial",
        "e.filepart",
        "f.jsonl~",
        ".hidden.jsonl",
        "notes.txt",
    ]
    for n in names:
        (tmp_path / "echo" / n).write_text("{}\n")
    (tmp_path / "echo/link.jsonl").symlink_to(outside)
    os.mkfifo(tmp_path / "echo/fifo.jsonl")
    (tmp_path / "echo/dir.jsonl").mkdir()
    (tmp_path / "echo/loop.jsonl").symlink_to(tmp_path / "echo/loop.jsonl")
    scanner, clock = make_scanner(tmp_path)
    scanner.scan()
    clock.t += 5
    assert scanner.scan() == []


def test_ready_marker_is_required_when_configured(tmp_path: Path) -> None:
    (tmp_path / "echo").mkdir()
    scanner, clock = make_scanner(tmp_path, require_ready_marker=True)
    (tmp_path / "echo/a.jsonl").write_text("{}\n")
    scanner.scan()
    clock.t += 5
    assert scanner.scan() == []
    (tmp_path / "echo/a.jsonl.ready").write_text("")
    assert len(scanner.scan()) == 1


def test_filesystem_type_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        "40 22 0:40 / /mnt/share rw - nfs4 server:/x rw\n"
        "41 22 0:41 / /mnt/fuse\\040dir rw - fuse.sshfs host: rw\n"
    )
    assert filesystem_type(Path("/mnt/share/inbox"), str(info)) == "nfs4"
    assert filesystem_type(Path("/mnt/fuse dir/inbox"), str(info)) == "fuse.sshfs"
    assert filesystem_type(Path("/home/x"), str(info)) == "ext4"
    assert should_poll(True, Path("/")) and not should_poll(False, Path("/"))


def test_slow_cp_rsync_rename_mv_and_stalled_writer_are_each_taken_once_whole(
    root: Path, tmp_path: Path, daemon
) -> None:
    lines = [json.dumps(chat_line(i)) + "\n" for i in range(400)]
    d = daemon(root, "--settle", "0.6")
    try:
        # rsync: a hidden temporary name, then a rename into place
        hidden = root / "inbox/echo/.rsynced.jsonl.Ab12Cd"
        hidden.write_text("".join(lines))
        time.sleep(0.3)
        os.rename(hidden, root / "inbox/echo/rsynced.jsonl")
        # mv from outside the tree
        outside = tmp_path / "moved.jsonl"
        outside.write_text("".join(lines))
        shutil.move(outside, root / "inbox/echo/moved.jsonl")

        # a slow cp, and a writer that stalls mid-file for less than the settle time
        def slow(name: str, pause_every: int, pause: float) -> None:
            with open(root / f"inbox/echo/{name}.jsonl", "w") as f:
                for i, line in enumerate(lines):
                    f.write(line)
                    f.flush()
                    if i % pause_every == 0:
                        time.sleep(pause)

        writers = [
            threading.Thread(target=slow, args=("slowcp", 20, 0.02)),
            threading.Thread(target=slow, args=("stall", 200, 0.3)),
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        for name in ("rsynced", "moved", "slowcp", "stall"):
            wait_for(lambda n=name: finished(root, n), what=name)
    finally:
        d.kill(signal.SIGTERM)
    for name in ("rsynced", "moved", "slowcp", "stall"):
        out = read_jsonl(root / f"outbox/{name}/echo.jsonl")
        assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(400)], name
    assert sorted(p.name for p in (root / "outbox").iterdir()) == ["moved", "rsynced", "slowcp", "stall"]


def test_polling_mode_gives_the_same_results(root: Path, daemon) -> None:
    d = daemon(root, "--poll", "--poll-interval", "0.2")
    try:
        wait_for(lambda: (root / "state/status.json").exists(), what="daemon up")
        write_jsonl(root / "inbox/echo/polled.jsonl", [chat_line(i) for i in range(50)])
        wait_for(lambda: finished(root, "polled"), what="polled drop")
        status = json.loads((root / "state/status.json").read_text())
        assert status["watch_mode"] == "polling"
    finally:
        d.kill(signal.SIGTERM)
    assert len(read_jsonl(root / "outbox/polled/echo.jsonl")) == 50


def test_drop_while_the_daemon_is_down_is_taken_at_start(root: Path) -> None:
    run_once(root)
    write_jsonl(root / "inbox/echo/later.jsonl", [chat_line(0)])
    run_once(root)
    assert batch_json(root, "later")["status"] == "completed"


def test_names_with_spaces_and_unicode(root: Path) -> None:
    write_jsonl(root / "inbox/echo/données de test ü.jsonl", [chat_line(0)])
    run_once(root)
    assert batch_json(root, "données de test ü")["status"] == "completed"


def test_symlink_to_outside_is_never_followed(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jsonl"
    write_jsonl(secret, [chat_line(0)])
    before = secret.read_bytes()
    (root / "inbox/echo/link.jsonl").symlink_to(secret)
    run_once(root)
    assert secret.read_bytes() == before
    assert (root / "inbox/echo/link.jsonl").is_symlink(), "a symlink is left alone"
    assert not (root / "outbox/link").exists()


@pytest.mark.parametrize("step", ["after_intent", "after_move", "after_outbox"])
def test_crash_between_claim_steps_loses_and_duplicates_nothing(root: Path, step: str) -> None:
    import subprocess
    import sys

    write_jsonl(root / "inbox/echo/c.jsonl", [chat_line(i) for i in range(10)])
    proc = subprocess.run(
        [sys.executable, "-m", "dropbox_runner", "run", "--once", "--root", str(root)],
        env={**os.environ, "DROPBOX_RUNNER_CRASH_AT": step},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 137
    run_once(root)
    assert [p.name for p in (root / "outbox").iterdir()] == ["c"]
    out = read_jsonl(root / "outbox/c/echo.jsonl")
    assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(10)]
    assert len(list((root / "state/archive").iterdir())) == 1
    assert not list((root / "state/claims").iterdir())


def test_a_dead_watcher_is_replaced_by_a_polling_one(tmp_path: Path) -> None:
    from dropbox_runner.intake.watcher import Watcher

    w = Watcher(tmp_path, poll=False, poll_interval=0.1)
    w.start()
    assert w.mode == "inotify"
    w._observer.stop()  # what a failing handler or a vanished share does to the observer thread
    w._observer.join()
    w.check()
    try:
        assert w.mode == "polling" and w._observer.is_alive()
        w.changed.clear()
        (tmp_path / "new.jsonl").write_text("{}\n")
        assert w.changed.wait(5), "the polling watcher still wakes the daemon"
    finally:
        w.stop()
