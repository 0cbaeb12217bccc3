"""Taking a complete drop: journal the intent, move the file into state/, then record the job.

Each step is idempotent, so `finish_pending` completes any claim a crash interrupted. Taking is a
boundary: a drop whose taking fails twice is set aside in state/quarantine/, never replayed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from dropbox_runner.config import Registry
from dropbox_runner.errors import fault_point, is_environmental
from dropbox_runner.fsutil import (
    NotRegularFile,
    files_equal,
    fsync_dir,
    move_into,
    read_json,
    read_json_or_none,
    write_json,
)
from dropbox_runner.intake.manifest import Manifest, read_manifest, window_seconds
from dropbox_runner.intake.names import beside, from_record, outbox_stem, shown, to_record
from dropbox_runner.intake.scanner import Drop
from dropbox_runner.jobs.operations import Jobs
from dropbox_runner.jobs.retention import note_output_expiry
from dropbox_runner.lines.parse import summarize
from dropbox_runner.queue.journal import JobSpec, new_job_id
from dropbox_runner.results import dedupe

log = logging.getLogger("dropbox_runner.intake")

ATTEMPTS = 2


def _crash_point(step: str) -> None:
    # Test hook: DROPBOX_RUNNER_CRASH_AT=<step> kills the daemon right there, as kill -9 would.
    if os.environ.get("DROPBOX_RUNNER_CRASH_AT") == step:
        os._exit(137)


class Claimer:
    def __init__(self, jobs: Jobs, registry: Registry) -> None:
        self.jobs = jobs
        self.journal = jobs.journal
        self.layout = jobs.layout
        self.registry = registry
        self._failed_moves: dict[Path, int] = {}

    def claim(self, drop: Drop) -> None:
        """Take one drop. Raises only for a failing disk (the daemon pauses and tries again)."""
        job_id = new_job_id()
        record = {
            "job_id": job_id,
            "source": shown(drop.path),  # for people; *_raw are the exact bytes of the names
            "source_raw": to_record(drop.path),
            "manifest": shown(drop.manifest) if drop.manifest else None,
            "manifest_raw": to_record(drop.manifest),
            "model_folder": shown(drop.model_folder) if drop.model_folder is not None else None,
            "reject": drop.reject,
            "created_at": time.time(),
            "attempts": 0,
        }
        write_json(self._intent(job_id), record)
        _crash_point("after_intent")
        try:
            self.journal.make_dir(job_id)
            job_dir = self.layout.active_job(job_id)
            if drop.manifest is not None:
                move_into(drop.manifest, job_dir.manifest(drop.manifest.suffix))
            move_into(drop.path, job_dir.input, after_copy=lambda: _crash_point("after_copy"))
        except (FileNotFoundError, NotRegularFile) as exc:
            log.info("%s was not taken: %s", shown(drop.path), shown(str(exc)))
            self._abandon(job_id, record)
            return
        except Exception as exc:
            self._abandon(job_id, record)
            if is_environmental(exc):  # e.g. state/ is full: the drop stays in the inbox
                raise
            self._move_failed(drop, exc)
            return
        marker = beside(drop.path, ".ready")
        if marker is not None:
            marker.unlink(missing_ok=True)
        _crash_point("after_move")
        self._finish_guarded(job_id)

    def _intent(self, job_id: str) -> Path:
        return self.layout.claim(job_id)

    def _abandon(self, job_id: str, record: dict[str, Any]) -> None:
        manifest = self.layout.active_job(job_id).taken_manifest()
        back = from_record(record.get("manifest_raw"), record.get("manifest"))
        if manifest is not None and back is not None:  # give the manifest back with its file
            move_into(manifest, back)
        self.journal.forget(job_id)
        self._intent(job_id).unlink(missing_ok=True)

    def _move_failed(self, drop: Drop, exc: Exception) -> None:
        n = self._failed_moves[drop.path] = self._failed_moves.get(drop.path, 0) + 1
        where = shown(drop.path)
        log.error("could not take %s (attempt %d): %s", where, n, shown(str(exc)))
        if n >= ATTEMPTS:
            job_id = new_job_id()
            self.jobs.quarantine(job_id, f"{where} could not be moved out of the inbox: {shown(str(exc))}")
            try:
                move_into(drop.path, self.layout.quarantined_job(job_id).path / drop.path.name)
            except OSError as again:
                log.error("%s stays in the inbox; the daemon ignores it until restarted (%s)", where, again)

    def ignored(self, path: Path) -> bool:
        """A drop that could not be moved twice: left alone until the next start."""
        return self._failed_moves.get(path, 0) >= ATTEMPTS

    def finish_pending(self) -> None:
        """Complete every claim a crash or a failure interrupted, or undo those that never moved the file."""
        for entry in sorted(self.layout.claims.glob("batch_*.json")):
            record = read_json_or_none(entry)
            if not isinstance(record, dict) or not isinstance(record.get("job_id"), str):
                entry.unlink()
                continue
            try:
                self._resume(record)
            except Exception as exc:  # a boundary too: no claim record stops the daemon at start
                if is_environmental(exc):
                    raise
                log.exception("resuming the claim %s failed", entry.name)
                self._count_failure(record["job_id"], exc)

    def _resume(self, record: dict[str, Any]) -> None:
        job_id = record["job_id"]
        taken = self.layout.active_job(job_id).input
        if not taken.exists():
            log.info("claim %s had not moved its file yet; it stays in the inbox", job_id)
            self._abandon(job_id, record)
            return
        source = from_record(record.get("source_raw"), record.get("source"))
        if source is not None and source.is_file() and not source.is_symlink() and files_equal(source, taken):
            # A crash between the copy into state/ and the removal from the inbox.
            log.info("removing %s from the inbox: its copy was taken before a crash", shown(source))
            source.unlink()
            fsync_dir(source.parent)
        log.info("finishing the claim of %s", record.get("source"))
        self._finish_guarded(job_id)

    def _finish_guarded(self, job_id: str) -> None:
        try:
            self.finish(job_id)
        except Exception as exc:
            if is_environmental(exc):
                raise
            log.exception("taking %s failed", job_id)
            self._count_failure(job_id, exc)

    def _count_failure(self, job_id: str, exc: Exception) -> None:
        """One more failed attempt at a claim; at ATTEMPTS the job goes to state/quarantine/."""
        record = read_json_or_none(self._intent(job_id))
        record = record if isinstance(record, dict) else {"job_id": job_id}
        attempts = record.get("attempts")
        record["attempts"] = (attempts if isinstance(attempts, int) else 0) + 1
        if record["attempts"] >= ATTEMPTS:
            reason = f"taking {record.get('source', 'the drop')} failed {ATTEMPTS} times; last: {exc!r}"
            self.jobs.quarantine(job_id, reason[:2000])
            self._intent(job_id).unlink(missing_ok=True)
        else:
            write_json(self._intent(job_id), record)

    def finish(self, job_id: str) -> None:
        record = read_json(self._intent(job_id))
        job_dir = self.layout.active_job(job_id)
        source = from_record(record.get("source_raw"), record["source"])
        stem = source.name[: -len(".jsonl")]
        rel_source = shown(os.path.relpath(source, self.layout.inbox))
        spec = JobSpec(
            id=job_id,
            name=shown(stem),
            outbox="",
            source=rel_source,
            models=[],
            created_at=record["created_at"],
        )
        reasons = [record["reject"]] if record.get("reject") else []
        manifest = job_dir.taken_manifest()
        if manifest is not None:
            parsed = read_manifest(manifest)
            if isinstance(parsed, str):
                reasons.append(parsed)
            else:
                self._apply_manifest(spec, parsed, record.get("model_folder"), reasons)
        elif record.get("model_folder"):
            spec.models = [record["model_folder"]]
        fault_point("claim", spec.name)
        if not reasons:
            reasons += self._summarize(spec, job_dir.input)
        spec.rejected = reasons
        spec.fingerprints = (
            {} if reasons else dedupe.fingerprints(self.registry, self.layout.root, spec.models)
        )
        spec.outbox = self._outbox_folder(outbox_stem(stem), job_id)
        _crash_point("after_outbox")
        if reasons:
            self.jobs.rejected(spec)
            log.warning("rejected %s: %s", rel_source, "; ".join(reasons))
        else:
            if self.registry.settings.dedupe:
                dedupe.reuse(self.journal, spec)
            self.jobs.taken(spec)
            log.info(
                "took %s as %s: %d lines for %s -> outbox/%s/",
                rel_source,
                job_id,
                spec.total,
                ", ".join(spec.models),
                spec.outbox,
            )
        self._intent(job_id).unlink(missing_ok=True)
        fsync_dir(self.layout.claims)

    def _summarize(self, spec: JobSpec, input_path: Path) -> list[str]:
        """Counts, hash and first line errors into the spec; the reasons to reject the whole file."""
        limit = self.registry.settings.max_file_bytes
        try:
            size = os.lstat(input_path).st_size
            if size > limit:
                return [f"the file is {size} bytes, larger than max_file_bytes ({limit})"]
            summary = summarize(input_path)
        except NotRegularFile as exc:
            return [str(exc)]
        spec.sha256, spec.total, spec.valid = summary.sha256, summary.total, summary.valid
        spec.line_errors = [{"code": e.code, "message": e.message, "line": e.line} for e in summary.errors]
        if summary.not_utf8_line is not None:
            return [f"the file is not UTF-8 text (line {summary.not_utf8_line})"]
        if summary.valid == 0:
            first = summary.errors[0] if summary.errors else None
            return [
                "the file has no valid request line"
                + (f"; first problem: line {first.line}: {first.message}" if first else " (it is empty)")
            ]
        return []

    def _apply_manifest(self, spec: JobSpec, m: Manifest, folder: str | None, reasons: list[str]) -> None:
        spec.models = list(m.models) or ([folder] if folder else [])
        spec.priority, spec.defaults, spec.metadata = m.priority, m.defaults, m.metadata
        spec.output_expires_seconds = (m.output_expires_after or {}).get("seconds")
        if spec.output_expires_seconds:
            note_output_expiry(self.layout)
        if m.completion_window is not None:
            spec.completion_window = str(m.completion_window)
            spec.expires_at = spec.created_at + window_seconds(m.completion_window)
        if not spec.models:
            reasons.append('the manifest names no model; give "models": ["<model>", ...]')
        if len(set(spec.models)) != len(spec.models):
            reasons.append("the manifest names a model twice")
        unknown = [x for x in spec.models if x not in self.registry.models]
        if unknown:
            reasons.append(f"unknown model {unknown[0]!r}; known models: {', '.join(self.registry.models)}")

    def _outbox_folder(self, name: str, job_id: str) -> str:
        """outbox/<name>/, or <name>.2/, .3/...; an earlier attempt of this same claim is reused."""
        n = 1
        while True:
            folder = name if n == 1 else f"{name}.{n}"
            published = self.layout.outbox_folder(folder)
            path = published.path
            try:
                path.mkdir()
                fsync_dir(self.layout.outbox)
                return folder
            except FileExistsError:
                if path.is_dir() and not path.is_symlink():
                    existing = read_json_or_none(published.batch)
                    if (existing is None and not any(path.iterdir())) or (
                        isinstance(existing, dict) and existing.get("id") == job_id
                    ):
                        return folder
            n += 1
