"""The records the HTTP API keeps of the jobs it made, under `state/api/`: uploaded input files and
batch records (an API batch's model and the drop it became). Plain files, no web framework.

Retention retires them with their job; the API (above) reads and writes them. Client file names
never become paths: files are stored by id; batches map to drops by name.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dropbox_runner.fsutil import fsync_dir, read_json_or_none, staged, write_json
from dropbox_runner.layout import Layout

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def new_id(prefix: str) -> str:
    """OpenAI's shapes: `file-...` for files, `batch_...` for batches (as the runner's job ids)."""
    sep = "_" if prefix == "batch" else "-"
    return f"{prefix}{sep}{time.time_ns():x}{secrets.token_hex(4)}"


def safe_filename(name: str | None) -> str:
    """A display name only: no folders, no leading dots."""
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    return SAFE_NAME.sub("_", base).lstrip(".")[:200] or "upload.jsonl"


class ApiRecords:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.files = layout.api_files
        self.batches = layout.api_batches
        self.files.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)

    # -- uploaded files ------------------------------------------------------------------------------
    def save_upload(
        self, chunks: Iterable[bytes], filename: str | None, purpose: str, limit: int
    ) -> dict[str, Any]:
        """Stream an upload to disk; raises ValueError('too large') past `limit` bytes."""
        file_id = new_id("file")
        size = 0
        with staged(self.layout.api_upload(file_id)) as f:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ValueError("too large")
                f.write(chunk)
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": safe_filename(filename),
            "purpose": purpose,
            "status": "processed",
        }
        write_json(self.layout.api_upload_meta(file_id), meta)
        return meta

    def file_meta(self, file_id: str) -> dict[str, Any] | None:
        if not SAFE_NAME.sub("", file_id) == file_id or not file_id.startswith("file-"):
            return None
        return read_json_or_none(self.layout.api_upload_meta(file_id))

    def file_path(self, file_id: str) -> Path:
        return self.layout.api_upload(file_id)

    def list_files(self) -> list[dict[str, Any]]:
        metas = (read_json_or_none(p) for p in sorted(self.files.glob("file-*.json"), reverse=True))
        return [m for m in metas if m]

    def delete_file(self, file_id: str) -> bool:
        if self.file_meta(file_id) is None:
            return False
        self.file_path(file_id).unlink(missing_ok=True)
        self.layout.api_upload_meta(file_id).unlink(missing_ok=True)
        fsync_dir(self.files)
        return True

    # -- batches -------------------------------------------------------------------------------------
    def save_batch(self, record: dict[str, Any]) -> None:
        write_json(self.layout.api_batch(record["id"]), record)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        if SAFE_NAME.sub("", batch_id) != batch_id:
            return None
        return read_json_or_none(self.layout.api_batch(batch_id))

    def list_batches(self) -> list[dict[str, Any]]:
        records = (read_json_or_none(p) for p in sorted(self.batches.glob("batch*.json"), reverse=True))
        return [r for r in records if r]

    def batch_json(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The job's batch.json for an API batch: from its outbox, or as it ended once retention
        removed the job (its files then answer 404)."""
        if isinstance(record.get("final"), dict):
            return record["final"]
        return (
            read_json_or_none(self.layout.outbox_folder(record["outbox"]).batch)
            if record.get("outbox")
            else None
        )

    def output(self, record: dict[str, Any], batch: dict[str, Any] | None, kind: str) -> Path | None:
        """The batch's model's output (`kind` "out") or errors file ("err") in its job's outbox
        folder (`batch` is the job's batch.json), if it is there: not before the model's run ends,
        nor after retention."""
        folder = (batch or {}).get("output_folder")
        if not folder:
            return None
        published = self.layout.outbox_folder(folder)
        path = (published.output if kind == "out" else published.errors)(record["model"])
        return path if path.exists() else None


def retire(layout: Layout, metadata: dict[str, Any], final: dict[str, Any]) -> None:
    """Retention removes a job: its API batches keep its final batch.json (outputs gone), and the
    uploaded input goes once no batch still running needs it."""
    ids = metadata.get("api_batches")
    if not isinstance(ids, str) or not layout.api_batches.is_dir():  # not an API job, or never served
        return
    records = ApiRecords(layout)
    inputs = set()
    for batch_id in ids.split(","):
        record = records.batch(batch_id)
        if not isinstance(record, dict):
            continue
        record["final"] = {**final, "output_folder": None}
        records.save_batch(record)
        inputs.add(record.get("input_file_id"))
    still_needed = {r.get("input_file_id") for r in records.list_batches() if "final" not in r}
    for file_id in inputs - still_needed:
        if isinstance(file_id, str):
            records.delete_file(file_id)
