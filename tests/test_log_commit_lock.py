"""A task's results are buffered by the feeding loop while the committer writes and fsyncs the ones
before: an append never waits for a commit's fsync (it did, and every commit interval stalled the
engine for one fsync; with eight sharing tasks, for eight)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from dropbox_runner.results.log import ResultLog, committed_records


def test_an_append_does_not_wait_for_a_commit_held_in_its_fsync(tmp_path: Path, monkeypatch) -> None:
    log = ResultLog(tmp_path / "task.log", 3)
    log.append(0, True, 1, 2, b'{"n": 0}')
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        in_fsync.set()
        release.wait(60)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    committer = threading.Thread(target=log.commit)
    committer.start()
    appended = threading.Event()
    feeder = threading.Thread(target=lambda: (log.append(1, True, 1, 2, b'{"n": 1}'), appended.set()))
    try:
        assert in_fsync.wait(30), "the commit reached its fsync"
        feeder.start()
        assert appended.wait(30), "the append waited for the commit's fsync"
    finally:
        release.set()
        committer.join(30)
        feeder.join(30)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert log.marker.count == 1, "the first commit holds only what was buffered before it"
    assert log.commit() and log.marker.count == 2
    assert [r.index for r in committed_records(tmp_path / "task.log")] == [0, 1]
    log.close()


def test_a_frozen_log_takes_appends_and_writes_none(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "task.log", 2)
    log.append(0, True, 1, 1, b"{}")
    assert log.commit()
    log.freeze()  # the process is about to die: nothing more becomes durable
    log.append(1, True, 1, 1, b"{}")  # the feeding loop may still append: it must not hang
    assert [r.index for r in committed_records(tmp_path / "task.log")] == [0]
