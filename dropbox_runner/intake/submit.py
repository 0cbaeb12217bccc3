"""Putting a file into the inbox the safe way: manifest first, then the file under a hidden name,
fsync, rename. Used by `dropbox-runner submit` and by the HTTP API.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dropbox_runner.fsutil import fsync_dir, write_json
from dropbox_runner.layout import Layout


def free_stem(folder: Path, stem: str) -> str:
    candidate, n = stem, 1
    while (folder / f"{candidate}.jsonl").exists() or (folder / f"{candidate}.manifest.json").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def submit_file(
    layout: Layout,
    src: Path,
    models: list[str],
    *,
    one_model_folder: bool,
    stem: str,
    priority: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Drop `src` for `models`; returns the path it has in the inbox."""
    folder = layout.inbox / models[0] if one_model_folder else layout.inbox
    folder.mkdir(parents=True, exist_ok=True)
    stem = free_stem(folder, stem.lstrip(".") or "batch")
    if not one_model_folder or priority is not None or metadata:
        manifest: dict[str, Any] = {"priority": priority or 0}
        if not one_model_folder:
            manifest["models"] = models
        if metadata:
            manifest["metadata"] = metadata
        write_json(folder / f"{stem}.manifest.json", manifest)
    hidden = folder / f".{stem}.jsonl.submit"
    with open(src, "rb") as fin, open(hidden, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    target = folder / f"{stem}.jsonl"
    os.rename(hidden, target)
    fsync_dir(folder)
    return target
