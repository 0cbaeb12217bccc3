"""Putting a file into the inbox the safe way: manifest first, then the file under a hidden name,
fsync, rename. Used by `dropbox-runner submit` and by the HTTP API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dropbox_runner.fsutil import staged, write_json
from dropbox_runner.intake.names import MAX_STEM_BYTES, outbox_stem
from dropbox_runner.layout import Layout


def free_stem(folder: Path, stem: str) -> str:
    """A stem no drop in `folder` has; UTF-8 and short enough for its manifest and a `-N`."""
    stem = outbox_stem(stem, MAX_STEM_BYTES - 8)
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
    completion_window: str | None = None,
) -> Path:
    """Drop `src` for `models`; returns the path it has in the inbox."""
    folder = layout.inbox / models[0] if one_model_folder else layout.inbox
    folder.mkdir(parents=True, exist_ok=True)
    stem = free_stem(folder, stem.lstrip(".") or "batch")
    if not one_model_folder or priority is not None or metadata or completion_window:
        manifest: dict[str, Any] = {"priority": priority or 0}
        if completion_window:
            manifest["completion_window"] = completion_window
        if not one_model_folder:
            manifest["models"] = models
        if metadata:
            manifest["metadata"] = metadata
        write_json(folder / f"{stem}.manifest.json", manifest)
    target = folder / f"{stem}.jsonl"
    with open(src, "rb") as fin, staged(target) as fout:  # a hidden name until it is whole
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    return target
