"""What the HTTP API keeps of its own under `state/api/`: uploaded files and batch records.

Client file names never become paths: files are stored by id; batches map to drops by name.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

import orjson

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


class Store:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.files = layout.state / "api" / "files"
        self.batches = layout.state / "api" / "batches"
        self.files.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)

    # -- uploaded files ------------------------------------------------------------------------------
    def save_upload(self, chunks, filename: str | None, purpose: str, limit: int) -> dict[str, Any]:
        """Stream an upload to disk; raises ValueError('too large') past `limit` bytes."""
        file_id = new_id("file")
        size = 0
        with staged(self.files / f"{file_id}.jsonl") as f:
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
        write_json(self.files / f"{file_id}.json", meta)
        return meta

    def file_meta(self, file_id: str) -> dict[str, Any] | None:
        if not SAFE_NAME.sub("", file_id) == file_id or not file_id.startswith("file-"):
            return None
        return read_json_or_none(self.files / f"{file_id}.json")

    def file_path(self, file_id: str) -> Path:
        return self.files / f"{file_id}.jsonl"

    def list_files(self) -> list[dict[str, Any]]:
        metas = (read_json_or_none(p) for p in sorted(self.files.glob("file-*.json"), reverse=True))
        return [m for m in metas if m]

    def delete_file(self, file_id: str) -> bool:
        if self.file_meta(file_id) is None:
            return False
        self.file_path(file_id).unlink(missing_ok=True)
        (self.files / f"{file_id}.json").unlink(missing_ok=True)
        fsync_dir(self.files)
        return True

    # -- batches -------------------------------------------------------------------------------------
    def save_batch(self, record: dict[str, Any]) -> None:
        write_json(self.batches / f"{record['id']}.json", record)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        if SAFE_NAME.sub("", batch_id) != batch_id:
            return None
        return read_json_or_none(self.batches / f"{batch_id}.json")

    def list_batches(self) -> list[dict[str, Any]]:
        records = (read_json_or_none(p) for p in sorted(self.batches.glob("batch*.json"), reverse=True))
        return [r for r in records if r]


def forget_api_batches(layout: Layout, ids: object) -> None:
    """A removed job's batch records (`metadata.api_batches`, comma-separated) leave state/api/ with it."""
    if not isinstance(ids, str):
        return
    folder = layout.state / "api" / "batches"
    for batch_id in ids.split(","):
        if batch_id and SAFE_NAME.sub("", batch_id) == batch_id:
            (folder / f"{batch_id}.json").unlink(missing_ok=True)
    if folder.is_dir():
        fsync_dir(folder)


def first_models(path: Path) -> set[str]:
    """The `body.model` values of a file's lines (streaming; lines that do not parse are skipped)."""
    models: set[str] = set()
    with open(path, "rb") as f:
        for line in f:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            model = (
                obj.get("body", {}).get("model")
                if isinstance(obj, dict) and isinstance(obj.get("body"), dict)
                else None
            )
            if isinstance(model, str):
                models.add(model)
    return models
