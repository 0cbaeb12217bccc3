"""Reading the jobs under state/, live and archived, as plain JSON: the one reader that status, the
CLI, the API and the daemon's recovery share. Reads only; `jobs` writes.

No pydantic here, so `dropbox-runner status` starts fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from dropbox_runner.layout import Layout

JOB_PREFIX = "batch_"


def job_ids(folder: Path) -> list[str]:
    """The job folders in `folder` (state/jobs or state/archive), newest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if n.startswith(JOB_PREFIX)), reverse=True)


def active_ids(layout: Layout) -> list[str]:
    return [j for j in job_ids(layout.jobs) if layout.active_job(j).spec.exists()]


def _load(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


@dataclass
class JobFiles:
    """One job as its files say, read in one go."""

    folder: Path
    spec: dict[str, Any]
    tasks: list[dict[str, Any]]
    markers: dict[str, dict[str, Any] | None]


def read_job(layout: Layout, job_id: str) -> JobFiles | None:
    """A job's spec, task records and markers, or None if it has no spec (gone or half made).

    A job can move to the archive while it is read: then it is read again from there.
    """
    for _ in range(3):
        files = layout.job(job_id)
        try:
            spec = _load(files.spec)
            models = [] if spec.get("rejected") else spec["models"]
            tasks = [_load(files.task(m)) for m in models]
            markers = {m: _load_or_none(files.marker(m)) for m in models}
            return JobFiles(files.path, spec, tasks, markers)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
    return None


def _load_or_none(path: Path) -> Any | None:
    try:
        return _load(path)
    except (FileNotFoundError, NotADirectoryError, orjson.JSONDecodeError):
        return None


def find_job(layout: Layout, ref: str) -> str | None:
    """The id of a job given its id, its outbox folder name or its drop name (the newest of that name)."""
    if ref.startswith(JOB_PREFIX) and "/" not in ref and _is_dir(layout.job_dir(ref)):
        return ref
    best: tuple[int, float, str] | None = None
    for folder, files in ((layout.jobs, layout.active_job), (layout.archive, layout.archived_job)):
        for job_id in job_ids(folder):
            spec = _load_or_none(files(job_id).spec)
            if not isinstance(spec, dict):
                continue
            if ref in (spec.get("outbox"), spec.get("name")):
                rank = (1 if spec["outbox"] == ref else 0, spec["created_at"], job_id)
                best = max(best, rank) if best else rank
    return best[2] if best else None


def _is_dir(path: Path) -> bool:
    """is_dir that answers False for a name the filesystem cannot hold (ENAMETOOLONG) too."""
    try:
        return path.is_dir()
    except OSError:
        return False


def quarantined(layout: Layout) -> list[dict[str, Any]]:
    """Drops set aside because taking them failed twice: id, source and reason."""
    out = []
    for job_id in job_ids(layout.quarantine):
        try:
            reason = (
                layout.quarantined_job(job_id).reason.read_text(encoding="utf-8", errors="replace").strip()
            )
        except OSError:
            reason = "(no reason.txt)"
        out.append({"id": job_id, "folder": f"state/quarantine/{job_id}/", "reason": reason})
    return out


def undelivered_events(layout: Layout) -> int:
    """Webhook events journaled and not yet delivered to every URL."""
    try:
        return len([n for n in os.listdir(layout.webhooks) if n.startswith("evt_")])
    except FileNotFoundError:
        return 0
