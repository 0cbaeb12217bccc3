"""The short nemesis of `make test` (bench/nemesis.py; `make nemesis` is the long one), and its
disk-full hook in the staged writer."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from dropbox_runner import fsutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import nemesis  # noqa: E402

SHORT_SECONDS = 25  # faults for this long, then the drain and the checks: about a minute in all


def test_a_short_nemesis_run_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    said: list[str] = []
    run = nemesis.Nemesis(
        seed=94, seconds=SHORT_SECONDS, work=tmp_path, include_pending=False, say=said.append
    )
    try:
        ok = run.run()
    finally:
        nemesis.unmount(tmp_path / "root")
    with capsys.disabled():
        print("\n" + "\n".join(said))
    assert ok, "\n".join(said)
    assert sum(run.faults.values()) >= 3, "the run threw too few faults to mean anything"
    assert run.incarnation >= 2, "the daemon was killed or restarted at least once"
    assert len(run.jobs) >= 4


def test_the_disk_full_hook_fails_staged_writes_only_while_its_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "full"
    target = tmp_path / "out.json"
    fsutil.write_json(target, {"a": 1})  # the hook is off by default
    monkeypatch.setenv(fsutil.TEST_ENOSPC_ENV, str(flag))
    fsutil.write_json(target, {"a": 2})  # on, but the disk is not full yet
    flag.touch()
    with pytest.raises(OSError) as err:
        fsutil.write_json(target, {"a": 3})
    assert err.value.errno == errno.ENOSPC
    assert fsutil.read_json(target) == {"a": 2}, "the file is left as it was"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging file left"
    flag.unlink()
    fsutil.write_json(target, {"a": 4})
    assert fsutil.read_json(target) == {"a": 4}
