"""The plan of a task spread over copies, made in a short-lived child process so the daemon's memory
stays flat whatever the file's size: where every CHECKPOINT-th line starts (so a copy reads only its
shard) and which lines repeat an earlier custom_id (they fail in place, as with one copy).

`python -m dropbox_runner.shardplan INPUT` prints one JSON document.
"""

from __future__ import annotations

import sys

import orjson

from dropbox_runner.lines import IdSet, iter_raw_lines, quote

CHECKPOINT = 64


def plan(path: str) -> dict:
    checkpoints, duplicates, seen = [], [], IdSet()
    with open(path, "rb") as f:
        for raw in iter_raw_lines(f):
            if raw.index % CHECKPOINT == 0:
                checkpoints.append([raw.index, raw.offset, raw.line])
            try:
                obj = orjson.loads(raw.data) if raw.data is not None else None
            except orjson.JSONDecodeError:
                continue
            cid = obj.get("custom_id") if isinstance(obj, dict) else None
            if isinstance(cid, str) and cid and not seen.add(cid):
                duplicates.append([raw.index, raw.line, cid, f"duplicate custom_id {quote(cid)}"])
    return {"checkpoints": checkpoints, "duplicates": duplicates}


if __name__ == "__main__":
    sys.stdout.buffer.write(orjson.dumps(plan(sys.argv[1])))
