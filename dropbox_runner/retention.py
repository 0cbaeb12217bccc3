"""Retention (`keep_finished_days`): finished jobs older than that leave state/archive/ and outbox/.

Only what the job itself published goes: its outbox folder only while its batch.json names the job.
"""

from __future__ import annotations

import logging
import shutil

from dropbox_runner import catalog, dedupe
from dropbox_runner.api import store as api_store  # plain files only: no web framework
from dropbox_runner.errors import is_environmental
from dropbox_runner.fsutil import fsync_dir, read_json_or_none
from dropbox_runner.journal import Journal
from dropbox_runner.results.batchfile import batch_document

log = logging.getLogger("dropbox_runner.retention")


def prune(journal: Journal, keep_days: float, now: float) -> list[str]:
    """Remove finished jobs older than `keep_days` from state/archive/ and outbox/; returns them.

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
        if finished_at is None or now - finished_at < keep_days * 86400:
            continue
        try:
            folder = _remove(journal, job_id)
        except Exception as exc:  # one broken job never stops retention, nor the daemon
            if is_environmental(exc):
                raise
            log.exception("could not remove %s", job_id)
            continue
        log.info(
            "removed %s (%s), finished %.1f days ago (keep_finished_days %g)",
            job_id,
            f"outbox/{folder}/" if folder else "its outbox folder is no longer its own",
            (now - finished_at) / 86400,
            keep_days,
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
    api_store.retire(layout, spec.metadata, final)
    dedupe.forget(journal, spec)
    outbox = layout.outbox / spec.outbox
    owner = read_json_or_none(outbox / "batch.json") if not outbox.is_symlink() else None
    mine = isinstance(owner, dict) and owner.get("id") == job_id
    if mine:
        shutil.rmtree(outbox, ignore_errors=True)
    shutil.rmtree(layout.archive / job_id, ignore_errors=True)
    return spec.outbox if mine else None
