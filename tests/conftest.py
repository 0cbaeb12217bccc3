"""Fixtures only (the functions tests share are in helpers.py): a fresh root per test with the echo
models, and daemons that are always ended.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import Daemon, make_root

TMPFS = "/dev/shm"
TMPFS_MIN_FREE = 8 * 1024**3
_made = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Test folders on tmpfs where there is one (docs/testing.md): every write the runner makes
    still goes through its fsync, which tmpfs answers at once instead of after a busy disk's
    queue. Kills, never power cuts, are what the tests inflict, so nothing they prove changes.
    --basetemp, or DROPBOX_RUNNER_TEST_TMP=disk, keeps pytest's own place on the disk."""
    if config.option.basetemp or os.environ.get("DROPBOX_RUNNER_TEST_TMP") == "disk" or not _tmpfs(TMPFS):
        return
    config.option.basetemp = tempfile.mkdtemp(prefix="dropbox-runner-tests-", dir=TMPFS)
    config.stash[_made] = config.option.basetemp


def pytest_unconfigure(config: pytest.Config) -> None:
    made = config.stash.get(_made, None)
    if made:  # tmpfs is memory: a run leaves nothing in it
        shutil.rmtree(made, ignore_errors=True)


def _tmpfs(path: str) -> bool:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    if not (any(m.split()[1:3] == [path, "tmpfs"] for m in mounts) and os.access(path, os.W_OK)):
        return False
    st = os.statvfs(path)  # a container's default /dev/shm is 64 MB: the suite writes gigabytes
    return st.f_bavail * st.f_frsize >= TMPFS_MIN_FREE


@pytest.fixture(autouse=True)
def _no_ambient_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test runs on the folder it was started from: without the `root` fixture, a command that
    is given no --root finds an empty folder of the test's own."""
    monkeypatch.setenv("DROPBOX_RUNNER_ROOT", str(tmp_path / "no-root"))


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A root of the echo models (helpers.ECHO_YAML and `gated`); DROPBOX_RUNNER_ROOT points at it."""
    r = make_root(tmp_path / "root")
    monkeypatch.setenv("DROPBOX_RUNNER_ROOT", str(r))
    return r


@pytest.fixture
def daemon() -> Iterator[Callable[..., Daemon]]:
    """Starts daemons (daemon(root, *args, env=...)) as subprocesses; the finalizer kills each one's
    process group and every process below it, also when the test failed."""
    started: list[Daemon] = []

    def start(root: Path, *args: str, env: dict | None = None) -> Daemon:
        d = Daemon(root, *args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.end()
