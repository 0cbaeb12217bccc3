"""The daemon claims a drop when it settles, not at the next fast scan after (up to 0.25 s later):
the scanner says when its first pending candidate settles, and the loop waits no longer than that."""

from __future__ import annotations

from pathlib import Path

from dropbox_runner.config import Settings
from dropbox_runner.intake.scanner import Scanner
from dropbox_runner.intake.watcher import scan_due


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_scanner_says_when_its_first_pending_drop_settles(tmp_path: Path) -> None:
    (tmp_path / "echo").mkdir()
    clock = Clock()
    scanner = Scanner(tmp_path, Settings(settle_seconds=0.5), ["echo"], clock)
    assert scanner.scan() == [] and scanner.settles_at is None, "nothing pending, nothing to wait for"
    (tmp_path / "echo/a.jsonl").write_text("x\n")
    assert scanner.scan() == [] and scanner.settles_at == 1000.5
    clock.t = 1000.2
    (tmp_path / "echo/b.jsonl").write_text("y\n")
    assert scanner.scan() == [] and scanner.settles_at == 1000.5, "the earliest of the two"
    clock.t = 1000.5
    assert [d.path.name for d in scanner.scan()] == ["a.jsonl"]
    assert scanner.settles_at == 1000.7, "b, seen first at 1000.2, is next"
    (tmp_path / "echo/a.jsonl").unlink()  # claimed
    scanner.forget(tmp_path / "echo/a.jsonl")
    clock.t = 1000.7
    assert [d.path.name for d in scanner.scan()] == ["b.jsonl"] and scanner.settles_at is None


def test_a_scan_is_due_when_a_drop_settles_even_right_after_the_last_scan() -> None:
    assert scan_due(changed=False, busy_intake=True, since_last=0.01, rescan_seconds=30, settled=True)
    assert not scan_due(changed=False, busy_intake=True, since_last=0.01, rescan_seconds=30, settled=False)
