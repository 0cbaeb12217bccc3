"""Wakes the daemon when the inbox changes: inotify, or polling on network and FUSE filesystems.

watchdog drops inotify overflows and dies with a failing handler or a vanished share, so the daemon
also rescans periodically and `Watcher.check` replaces a dead observer by a polling one.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("dropbox_runner.intake")

FAST_SCAN_SECONDS = 0.25  # while a candidate settles or waits for its manifest
NETWORK_FS_PREFIXES = ("nfs", "cifs", "smb", "fuse", "9p", "sshfs", "afs", "ceph", "glusterfs", "lustre")


def filesystem_type(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    target = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return best_type
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    return best_type


def scan_due(
    changed: bool, busy_intake: bool, since_last: float, rescan_seconds: float, settled: bool = False
) -> bool:
    """Scan the inbox when the watcher saw a change, when a candidate settles, every FAST_SCAN_SECONDS
    while candidates settle or wait, or every rescan_seconds."""
    return (
        changed
        or settled
        or (busy_intake and since_last >= FAST_SCAN_SECONDS)
        or since_last >= rescan_seconds
    )


def should_poll(setting: str | bool, path: Path) -> bool:
    if setting == "auto":
        return filesystem_type(path).startswith(NETWORK_FS_PREFIXES)
    return bool(setting)


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


class Watcher:
    def __init__(self, inbox: Path, poll: bool, poll_interval: float) -> None:
        self.inbox = inbox
        self.poll = poll
        self.poll_interval = poll_interval
        self.changed = threading.Event()
        self._observer = None

    @property
    def mode(self) -> str:
        return "polling" if self.poll else "inotify"

    def start(self) -> None:
        observer = PollingObserver(timeout=self.poll_interval) if self.poll else Observer()
        observer.schedule(_Wake(self.changed), str(self.inbox), recursive=True)
        observer.daemon = True
        try:
            observer.start()
        except OSError as exc:  # inotify watch limit reached, or the share is gone
            if self.poll:
                raise
            log.warning("inotify failed (%s); polling the inbox instead", exc)
            self.poll = True
            return self.start()
        self._observer = observer
        log.info("watching %s (%s)", self.inbox, self.mode)

    def check(self) -> None:
        """Never alive but deaf: a dead observer is replaced by a polling one."""
        if self._observer is not None and not self._observer.is_alive():
            log.error("the inbox watcher died; starting a polling watcher")
            self.poll = True
            self.start()
            self.changed.set()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
