"""The plan of a task spread over copies, made in a short-lived child process so the daemon's memory
stays flat whatever the file's size: where every CHECKPOINT-th line starts (so a copy reads only its
shard) and which lines repeat an earlier custom_id (they fail in place, as with one copy).

`python -m dropbox_runner.slot.copies.plan INPUT` prints the plan as it goes, one JSON array a line:
`["c", index, offset, line]` for a checkpoint, `["d", index, offset, line]` for a repeated id. A
duplicate is named by where it is, not by its id (an id can be long and repeated thousands of times),
so the daemon reads the plan line by line and each duplicate's id from the input when it fails it.

`PlanThread` is the daemon's side: a thread that runs the child and hands its entries over through a
bounded queue, so the daemon's loop never waits on a whole input and holds a bounded part of the plan.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from typing import BinaryIO

import orjson

from dropbox_runner.lines.parse import IdSet, iter_raw_lines

CHECKPOINT = 64
PLAN_BUFFER = 8192  # entries of the plan read ahead of the daemon's loop, at most


def plan(path: str, out: BinaryIO) -> None:
    seen = IdSet()
    with open(path, "rb") as f:
        for raw in iter_raw_lines(f):
            if raw.index % CHECKPOINT == 0:
                out.write(orjson.dumps(["c", raw.index, raw.offset, raw.line]) + b"\n")
            cid = custom_id(raw.data)
            if cid is not None and not seen.add(cid):
                out.write(orjson.dumps(["d", raw.index, raw.offset, raw.line]) + b"\n")


def custom_id(data: bytes | None) -> str | None:
    """The line's custom_id if it is a non-empty string (what IdSet checks for repeats)."""
    try:
        obj = orjson.loads(data) if data is not None else None
    except orjson.JSONDecodeError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and cid else None


class PlanThread:
    """Runs `python -m dropbox_runner.slot.copies.plan INPUT` in a thread; `take` gives what it printed
    so far, then `("end", returncode)` once the child ended."""

    def __init__(self, input_path: str, cwd: str) -> None:
        self.cmd = [sys.executable, "-m", "dropbox_runner.slot.copies.plan", input_path]
        self.cwd = cwd
        self.entries: queue.Queue[list] = queue.Queue(maxsize=PLAN_BUFFER)
        self.stopped = threading.Event()
        self.child: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._run, name="shard plan", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:  # the child's stderr is the daemon's: a failure says why in its log
            with subprocess.Popen(self.cmd, stdout=subprocess.PIPE, cwd=self.cwd) as child:
                self.child = child
                for line in child.stdout:
                    if not self._put(orjson.loads(line)):
                        child.kill()
                        break
            self._put(["end", child.returncode])
        except (OSError, ValueError) as exc:
            self._put(["end", f"{type(exc).__name__}: {exc}"])

    def _put(self, entry: list) -> bool:
        while not self.stopped.is_set():
            try:
                self.entries.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def take(self, budget: int) -> list[list]:
        """Up to `budget` entries that are ready now (never waits)."""
        out = []
        while len(out) < budget:
            try:
                out.append(self.entries.get_nowait())
            except queue.Empty:
                break
        return out

    def stop(self) -> None:
        self.stopped.set()
        if self.child is not None and self.child.poll() is None:
            self.child.kill()


if __name__ == "__main__":
    plan(sys.argv[1], sys.stdout.buffer)
