"""The plan of a task spread over copies, made in a short-lived child process so the daemon's memory
stays flat whatever the file's size: where every CHECKPOINT-th line starts (so a copy reads only its
shard) and which lines repeat an earlier custom_id (they fail in place, as with one copy).

`python -m dropbox_runner.slot.copies.plan INPUT` prints the plan as it goes, one JSON array a line:
`["c", index, offset, line]` for a checkpoint, `["d", index, offset, line]` for a repeated id. A
duplicate is named by where it is, not by its id (an id can be long and repeated thousands of times),
so the daemon reads the plan line by line and each duplicate's id from the input when it fails it.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

import orjson

from dropbox_runner.lines.parse import IdSet, iter_raw_lines

CHECKPOINT = 64


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


if __name__ == "__main__":
    plan(sys.argv[1], sys.stdout.buffer)
