"""The daemon's account of itself, which `status`, the page and /metrics read: state/status.json (model
loaded, tasks running, swaps), written about once a second and at once when the model process
changes, with systemd's STATUS= line beside it; and state/daemon.log, whose last line is its last words.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from typing import Any

from dropbox_runner.daemon import systemd
from dropbox_runner.fsutil import read_json_or_none, write_json
from dropbox_runner.layout import Layout

SNAPSHOT_SECONDS = 1.0


def write_snapshot(layout: Layout, live: dict[str, Any]) -> None:
    """state/status.json: daemon.json's pid and host, the queue's length, and `live`."""
    info = read_json_or_none(layout.daemon_info) or {}
    queue = len(os.listdir(layout.queue)) if layout.queue.exists() else 0
    write_json(
        layout.snapshot, {**info, "updated_at": time.time(), "queue_length": queue, **live}, durable=False
    )


class Snapshots:
    """When a snapshot is due, and writing it (with systemd's STATUS=)."""

    def __init__(self, layout: Layout, notifier: systemd.Notifier) -> None:
        self.layout, self.notifier = layout, notifier
        self.last = 0.0  # monotonic
        self.model_state: tuple[int, bool] | None = None

    def due(self, model_state: tuple[int, bool] | None, force: bool = False) -> bool:
        """About once a second, and at once when the model process starts, loads or ends."""
        now = time.monotonic()
        if not force and model_state == self.model_state and now - self.last < SNAPSHOT_SECONDS:
            return False
        self.last, self.model_state = now, model_state
        return True

    def write(self, live: dict[str, Any]) -> None:
        write_snapshot(self.layout, live)
        self.notifier.status(lambda: systemd.status_line(live, self.layout.queue))


def setup_logging(layout: Layout, level: int = logging.INFO) -> None:
    """The daemon's log, to stderr and to state/daemon.log (rotated at 10 MiB)."""
    root = logging.getLogger("dropbox_runner")
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    filelog = logging.handlers.RotatingFileHandler(layout.log, maxBytes=10 << 20, backupCount=3)
    filelog.setFormatter(fmt)
    root.addHandler(stream)
    root.addHandler(filelog)
