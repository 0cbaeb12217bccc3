"""Retention (`keep_finished_days`, a job's `output_expires_after`): finished jobs past it leave
state/archive/ and outbox/.

Only what the job itself published goes: its outbox folder only while its batch.json names the job.
"""

from __future__ import annotations

import logging
import shutil

from dropbox_runner.errors import is_environmental
from dropbox_runner.fsutil import fsync_dir, read_json_or_none, write_atomic
from dropbox_runner.jobs import api_records
from dropbox_runner.layout import Layout
from dropbox_runner.queue import catalog
from dropbox_runner.queue.journal import Journal
from dropbox_runner.results import dedupe
from dropbox_runner.results.batchfile import batch_document

log = logging.getLogger("dropbox_runner.jobs.retention")


def prune(journal: Journal, keep_days: float | None, now: float) -> list[str]:
    """Remove finished jobs kept longer than `retention_seconds` from state/archive/ and outbox/;
    returns them.

    An outbox folder goes only if its batch.json says it is this job's: after the user removed it,
    a later drop of the same name may own that folder now.
    """
    layout = journal.layout
    removed = []
    for job_id in catalog.job_ids(layout.archive):
        job = catalog.read_job(layout, job_id)
        if job is None or job.folder.parent != layout.archive:
            continue
        ends = [t.get("completed_at") for t in job.tasks]
        finished_at = max((e for e in ends if e), default=None) if job.tasks else job.spec["created_at"]
        keep = retention_seconds(keep_days, job.spec.get("output_expires_seconds"))
        if finished_at is None or keep is None or now - finished_at < keep:
            continue
        try:
            folder = _remove(journal, job_id)
        except Exception as exc:  # one broken job never stops retention, nor the daemon
            if is_environmental(exc):
                raise
            log.exception("could not remove %s", job_id)
            continue
        log.info(
            "removed %s (%s), finished %.1f days ago (kept %.0f s)",
            job_id,
            f"outbox/{folder}/" if folder else "its outbox folder is no longer its own",
            (now - finished_at) / 86400,
            keep,
        )
        removed.append(job_id)
    if removed:
        fsync_dir(layout.archive)
        fsync_dir(layout.outbox)
    return removed


def _remove(journal: Journal, job_id: str) -> str | None:
    """Remove one archived job; returns its outbox folder if that was removed too."""
    layout = journal.layout
    spec = journal.spec(job_id)
    final = batch_document(journal, spec, [] if spec.rejected else journal.tasks(spec))
    api_records.retire(layout, spec.metadata, final)
    dedupe.forget(journal, spec)
    published = layout.outbox_folder(spec.outbox)
    outbox = published.path
    owner = read_json_or_none(published.batch) if not outbox.is_symlink() else None
    mine = isinstance(owner, dict) and owner.get("id") == job_id
    if mine:
        shutil.rmtree(outbox, ignore_errors=True)
    shutil.rmtree(layout.archived_job(job_id).path, ignore_errors=True)
    return spec.outbox if mine else None


def note_output_expiry(layout: Layout) -> None:
    """Retention then runs without keep_finished_days too (it reads the whole archive once a minute)."""
    flag = layout.output_expiry_flag
    if not flag.exists():
        write_atomic(flag, b"")


def retention_due(layout: Layout, keep_days: float | None) -> bool:
    return keep_days is not None or layout.output_expiry_flag.exists()


def retention_seconds(keep_days: float | None, output_expires_seconds: int | None) -> float | None:
    """How long a finished job is kept: the earlier of keep_finished_days and its own expiry; None: forever."""
    kept = keep_days * 86400 if keep_days is not None else None
    return min((s for s in (kept, output_expires_seconds) if s is not None), default=None)
