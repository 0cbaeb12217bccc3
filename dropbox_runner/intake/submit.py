"""Putting a file into the inbox the safe way (manifest first, then the file under a hidden name,
fsync, rename), and following the drop's batch.json to its end. Used by `submit` and the HTTP API.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropbox_runner.fsutil import staged, write_json
from dropbox_runner.intake.names import MAX_STEM_BYTES, outbox_stem
from dropbox_runner.layout import Layout, OutboxFolder, drop_file, drop_manifest

FINAL = ("completed", "failed", "cancelled", "expired")
POLL_SECONDS = 0.5
PLAIN_EVERY_SECONDS = 10.0  # without a terminal, a changed count is printed at most this often


def free_stem(folder: Path, stem: str) -> str:
    """A stem no drop in `folder` has; UTF-8 and short enough for its manifest and a `-N`."""
    stem = outbox_stem(stem, MAX_STEM_BYTES - 8)
    candidate, n = stem, 1
    while drop_file(folder, candidate).exists() or drop_manifest(folder, candidate).exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def new_submit_id() -> str:
    return f"sub_{time.time_ns():x}{secrets.token_hex(4)}"


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
    defaults: dict[str, Any] | None = None,
    output_expires_seconds: int | None = None,
) -> Path:
    """Drop `src` for `models`; returns the path it has in the inbox."""
    folder = layout.model_inbox(models[0]) if one_model_folder else layout.inbox
    folder.mkdir(parents=True, exist_ok=True)
    stem = free_stem(folder, stem.lstrip(".") or "batch")
    extras = {
        "completion_window": completion_window,
        "defaults": defaults,
        "metadata": metadata,
        "output_expires_after": {"anchor": "created_at", "seconds": output_expires_seconds}
        if output_expires_seconds
        else None,
    }
    if not one_model_folder or priority is not None or any(extras.values()):
        manifest: dict[str, Any] = {"priority": priority or 0}
        if not one_model_folder:
            manifest["models"] = models
        manifest.update({k: v for k, v in extras.items() if v})
        write_json(drop_manifest(folder, stem), manifest)
    target = drop_file(folder, stem)
    with open(src, "rb") as fin, staged(target) as fout:  # a hidden name until it is whole
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    return target


# -- following a drop: files only, so it works on a share whose daemon runs on another host ----------
def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def find_batch(layout: Layout, name: str, submit_id: str) -> tuple[str, dict[str, Any]] | None:
    """The outbox folder (`<name>/` or `<name>.N/`) whose batch.json carries `submit_id`, and that batch."""
    try:
        folders = [p for p in layout.outbox.iterdir() if p.name == name or p.name.startswith(f"{name}.")]
    except OSError:
        return None
    for folder in folders:
        doc = _read(OutboxFolder(folder).batch)
        if doc and isinstance(doc.get("metadata"), dict) and doc["metadata"].get("submit_id") == submit_id:
            return folder.name, doc
    return None


def model_line(name: str, model: str, entry: dict[str, Any]) -> str:
    counts = entry.get("request_counts") or {}
    total, done, failed = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
    rate = entry.get("tokens_per_second") or 0
    return (
        f"{name} {model}: {entry.get('status')} {done + failed}/{total} done, {failed} failed, {rate:g} tok/s"
    )


def progress_lines(name: str, doc: dict[str, Any]) -> list[str]:
    models = doc.get("models") or {}
    if not models:
        return [f"{name}: {doc.get('status')}"]
    return [model_line(name, m, e) for m, e in models.items()]


@dataclass
class Followed:
    """One submitted file being waited for."""

    name: str
    submit_id: str
    folder: str | None = None
    doc: dict[str, Any] | None = None
    shown: list[str] = field(default_factory=list)  # the plain lines last printed, and when
    shown_state: tuple = ()
    shown_at: float = 0.0

    @property
    def final(self) -> bool:
        return bool(self.doc) and self.doc.get("status") in FINAL

    def look(self, layout: Layout) -> None:
        if self.folder is None:
            found = find_batch(layout, self.name, self.submit_id)
            if found:
                self.folder, self.doc = found
        else:
            self.doc = _read(layout.outbox_folder(self.folder).batch) or self.doc

    def state(self) -> tuple:
        models = (self.doc or {}).get("models") or {}
        return (self.folder, (self.doc or {}).get("status"), *(e.get("status") for e in models.values()))

    def lines(self) -> list[str]:
        return progress_lines(self.name, self.doc) if self.doc else [f"{self.name}: waiting for the daemon"]

    def succeeded(self) -> bool:
        models = (self.doc or {}).get("models") or {}
        return bool(models) and all(e.get("status") == "completed" for e in models.values())

    def summary(self) -> list[str]:
        """What is said when the job ends: each model, its failed lines, the job's errors."""
        out = []
        for model, entry in ((self.doc or {}).get("models") or {}).items():
            counts = entry.get("request_counts") or {}
            line = f"{self.name} {model}: {entry.get('status')}, {counts.get('completed', 0)} of "
            line += f"{counts.get('total', 0)} lines succeeded, {counts.get('failed', 0)} failed"
            if counts.get("failed"):
                line += f" (outbox/{self.folder}/{model}.errors.jsonl)"
            out.append(line)
        errors = ((self.doc or {}).get("errors") or {}).get("data") or []
        out += [f"{self.name}: {e.get('message')}" for e in errors[:5] if e.get("line") is None]
        return out


def follow(
    layout: Layout,
    jobs: list[Followed],
    timeout: float | None,
    echo: Callable[[str], None],
    tty: bool,
) -> bool:
    """Poll the outbox until every job is final (True) or `timeout` runs out (False), printing progress.

    On a terminal the progress lines are redrawn in place; otherwise a line is printed when a status
    changes, and a changed count at most every PLAIN_EVERY_SECONDS.
    """
    deadline = time.monotonic() + timeout if timeout is not None else None
    drawn = 0
    while True:
        for job in jobs:
            job.look(layout)
        lines = [line for job in jobs for line in job.lines()]
        now = time.monotonic()
        if tty:
            echo(("\x1b[F" * drawn) + "".join(f"\x1b[2K{line}\n" for line in lines).rstrip("\n"))
            drawn = len(lines)
        else:
            for job in jobs:
                new, state = job.lines(), job.state()
                if new != job.shown and (
                    state != job.shown_state or now - job.shown_at >= PLAIN_EVERY_SECONDS
                ):
                    for line in new:
                        echo(line)
                    job.shown, job.shown_state, job.shown_at = new, state, now
        if all(job.final for job in jobs):
            return True
        if deadline is not None and now >= deadline:
            return False
        time.sleep(POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS, deadline - now)))
