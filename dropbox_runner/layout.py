"""The root folder, where everything lives under it, and the lock that makes one daemon per root
(taken by `acquire_root`, probed by `daemon_running`).

Every other module asks `Layout` for paths; nothing builds paths from a drop's name itself.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from filelock import FileLock, Timeout

from dropbox_runner.errors import LockHeld

ROOT_ENV = "DROPBOX_RUNNER_ROOT"


def resolve_root(root: str | Path | None) -> Path:
    if root is None:
        root = os.environ.get(ROOT_ENV) or os.getcwd()
    return Path(root).expanduser().absolute()


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def models_yaml(self) -> Path:
        return self.root / "models.yaml"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def jobs(self) -> Path:
        """Jobs not yet finished, one folder each: spec, input, result logs, task records."""
        return self.state / "jobs"

    @property
    def archive(self) -> Path:
        """Finished jobs, moved here whole so the active listing stays short."""
        return self.state / "archive"

    @property
    def queue(self) -> Path:
        """One entry per (job, model) task; lexical order of names is queue order."""
        return self.state / "queue"

    @property
    def claims(self) -> Path:
        """Intent records of drops being taken, so a crash mid-claim is finished at restart."""
        return self.state / "claims"

    @property
    def control(self) -> Path:
        """Requests from the CLI to the daemon (cancel, retry)."""
        return self.state / "control"

    @property
    def dedupe(self) -> Path:
        """Completed jobs by the digest of everything that decides their results."""
        return self.state / "dedupe"

    @property
    def quarantine(self) -> Path:
        """Drops whose taking failed twice, each with a reason.txt; never replayed."""
        return self.state / "quarantine"

    @property
    def lock(self) -> Path:
        return self.state / "daemon.lock"

    @property
    def daemon_info(self) -> Path:
        return self.state / "daemon.json"

    @property
    def snapshot(self) -> Path:
        return self.state / "status.json"

    @property
    def log(self) -> Path:
        return self.state / "daemon.log"

    @property
    def engine_log(self) -> Path:
        return self.state / "engine.log"

    def make(self, model_names: list[str] = ()) -> None:
        for d in (
            self.inbox,
            self.outbox,
            self.jobs,
            self.archive,
            self.queue,
            self.claims,
            self.control,
            self.dedupe,
            self.quarantine,
        ):
            d.mkdir(parents=True, exist_ok=True)
        for name in model_names:
            (self.inbox / name).mkdir(exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        active = self.jobs / job_id
        try:
            return active if active.exists() else self.archive / job_id
        except OSError:  # a name the filesystem cannot hold (ENAMETOOLONG) is no job of either folder
            return self.archive / job_id


LOCK_ATTEMPTS = 5  # `daemon_running` probes the lock for an instant: a starting daemon tries a few times


def acquire_root(layout: Layout) -> FileLock:
    """The kernel-released lock of the root; raises LockHeld naming the daemon that holds it."""
    layout.state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(layout.lock), timeout=0)
    for attempt in range(LOCK_ATTEMPTS):
        try:
            lock.acquire()
            return lock
        except Timeout:
            if attempt + 1 < LOCK_ATTEMPTS:
                time.sleep(0.1)
    try:
        info = orjson.loads(layout.daemon_info.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        info = {}
    raise LockHeld(
        f"another daemon (pid {info.get('pid', '?')} on {info.get('host', '?')}) is running on "
        f"{layout.root}; stop it first."
    )


def daemon_running(layout: Layout) -> bool:
    """Whether a daemon holds the root's lock (the one `acquire_root` takes). A shared lock is asked
    for: it works on a read-only descriptor everywhere (NFS emulates flock with fcntl locks, and
    refuses an exclusive one on a read-only descriptor with EBADF), and it fails while the daemon
    holds its exclusive lock."""
    try:
        fd = os.open(layout.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
