"""Taking a complete drop: journal the intent, move the file into state/, then record the job.

Each step is idempotent, so `finish_pending_claims` at start completes any claim a crash interrupted.
"""

from __future__ import annotations

import logging
import os
import time
from hashlib import blake2b
from pathlib import Path

from dropbox_runner.config import Registry
from dropbox_runner.fsutil import fsync_dir, move_into, read_json, read_json_or_none, write_json
from dropbox_runner.intake.manifest import Manifest, read_manifest
from dropbox_runner.intake.scanner import Drop
from dropbox_runner.journal import JobSpec, Journal, new_job_id
from dropbox_runner.lifecycle import Status
from dropbox_runner.requests import summarize
from dropbox_runner.results.publish import write_batch_json

log = logging.getLogger("dropbox_runner.intake")


def _crash_point(step: str) -> None:
    # Test hook: DROPBOX_RUNNER_CRASH_AT=<step> kills the daemon right there, as kill -9 would.
    if os.environ.get("DROPBOX_RUNNER_CRASH_AT") == step:
        os._exit(137)


def dedupe_key(sha256: str, models: list[str]) -> str:
    return f"{sha256}-{blake2b(','.join(models).encode(), digest_size=8).hexdigest()}"


class Claimer:
    def __init__(self, journal: Journal, registry: Registry) -> None:
        self.journal = journal
        self.layout = journal.layout
        self.registry = registry

    def claim(self, drop: Drop) -> JobSpec | None:
        job_id = new_job_id()
        record = {
            "job_id": job_id,
            "source": str(drop.path),
            "manifest": str(drop.manifest) if drop.manifest else None,
            "model_folder": drop.model_folder,
            "reject": drop.reject,
            "created_at": time.time(),
        }
        write_json(self.layout.claims / f"{job_id}.json", record)
        _crash_point("after_intent")
        job_dir = self.layout.jobs / job_id
        job_dir.mkdir(exist_ok=True)
        try:
            if drop.manifest is not None:
                move_into(drop.manifest, job_dir / f"manifest{drop.manifest.suffix}")
            move_into(drop.path, job_dir / "input.jsonl")
        except FileNotFoundError:
            log.info("%s vanished before it could be taken", drop.path)
            self._abandon(job_id, record)
            return None
        except OSError:  # e.g. state/ is full: the drop stays in the inbox and is tried again
            self._abandon(job_id, record)
            raise
        ready = drop.path.parent / f"{drop.path.name}.ready"
        ready.unlink(missing_ok=True)
        _crash_point("after_move")
        return self.finish(job_id)

    def _abandon(self, job_id: str, record: dict) -> None:
        job_dir = self.layout.jobs / job_id
        manifest = next(job_dir.glob("manifest.*"), None)
        if manifest is not None and record.get("manifest"):  # give the manifest back with its file
            move_into(manifest, Path(record["manifest"]))
        self.journal.forget(job_id)
        (self.layout.claims / f"{job_id}.json").unlink(missing_ok=True)

    def finish_pending(self) -> list[JobSpec]:
        """At start: complete every claim a crash interrupted, or undo those that never moved the file."""
        finished = []
        for entry in sorted(self.layout.claims.glob("batch_*.json")):
            record = read_json_or_none(entry)
            if record is None:
                entry.unlink()
                continue
            job_id = record["job_id"]
            if not (self.layout.jobs / job_id / "input.jsonl").exists():
                log.info("claim %s had not moved its file yet; it stays in the inbox", job_id)
                self._abandon(job_id, record)
                continue
            log.info("finishing the interrupted claim of %s", record["source"])
            spec = self.finish(job_id)
            if spec:
                finished.append(spec)
        return finished

    def finish(self, job_id: str) -> JobSpec | None:
        record = read_json(self.layout.claims / f"{job_id}.json")
        job_dir = self.layout.jobs / job_id
        source = Path(record["source"])
        name = source.name[: -len(".jsonl")]
        rel_source = os.path.relpath(source, self.layout.inbox)
        spec = JobSpec(
            id=job_id, name=name, outbox="", source=rel_source, models=[], created_at=record["created_at"]
        )
        reasons = [record["reject"]] if record.get("reject") else []
        manifest = next(job_dir.glob("manifest.*"), None)
        if manifest is not None:
            parsed = read_manifest(manifest)
            if isinstance(parsed, str):
                reasons.append(parsed)
            else:
                self._apply_manifest(spec, parsed, record.get("model_folder"), reasons)
        elif record.get("model_folder"):
            spec.models = [record["model_folder"]]
        input_path = job_dir / "input.jsonl"
        size = input_path.stat().st_size
        if not reasons and size > self.registry.settings.max_file_bytes:
            reasons.append(
                f"the file is {size} bytes, larger than max_file_bytes "
                f"({self.registry.settings.max_file_bytes})"
            )
        if not reasons:
            summary = summarize(input_path)
            spec.sha256, spec.total, spec.valid = summary.sha256, summary.total, summary.valid
            spec.line_errors = [
                {"code": e.code, "message": e.message, "line": e.line} for e in summary.errors
            ]
            if summary.not_utf8_line is not None:
                reasons.append(f"the file is not UTF-8 text (line {summary.not_utf8_line})")
            elif summary.valid == 0:
                reasons.append(
                    "the file has no valid request line"
                    + (
                        f"; first problem: line {summary.errors[0].line}: {summary.errors[0].message}"
                        if summary.errors
                        else " (it is empty)"
                    )
                )
        spec.rejected = reasons
        spec.outbox = self._outbox_folder(name, job_id)
        _crash_point("after_outbox")
        if reasons:
            write_json(job_dir / "spec.json", spec.model_dump())
            write_batch_json(self.journal, spec, [])
            self.journal.archive(job_id)
            log.warning("rejected %s: %s", rel_source, "; ".join(reasons))
        else:
            self._dedupe(spec)
            tasks = self.journal.create(spec)
            write_batch_json(self.journal, spec, tasks)
            log.info(
                "took %s as %s: %d lines for %s -> outbox/%s/",
                rel_source,
                job_id,
                spec.total,
                ", ".join(spec.models),
                spec.outbox,
            )
        (self.layout.claims / f"{job_id}.json").unlink(missing_ok=True)
        fsync_dir(self.layout.claims)
        return spec

    def _apply_manifest(self, spec: JobSpec, m: Manifest, folder: str | None, reasons: list[str]) -> None:
        spec.models = list(m.models) or ([folder] if folder else [])
        spec.priority, spec.defaults, spec.metadata = m.priority, m.defaults, m.metadata
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
            path = self.layout.outbox / folder
            try:
                path.mkdir()
                fsync_dir(self.layout.outbox)
                return folder
            except FileExistsError:
                existing = read_json_or_none(path / "batch.json")
                if (existing is None and not any(path.iterdir())) or (existing or {}).get("id") == job_id:
                    return folder
            n += 1

    def _dedupe(self, spec: JobSpec) -> None:
        """A byte-identical drop for the same models as a completed job reuses that job's logs."""
        if not self.registry.settings.dedupe:
            return
        earlier = read_json_or_none(self.layout.dedupe / f"{dedupe_key(spec.sha256, spec.models)}.json")
        if earlier is None:
            return
        src_dir = self.layout.job_dir(earlier["job_id"])
        if not all((src_dir / f"{m}.log").exists() for m in spec.models):
            return
        for m in spec.models:
            for suffix in (".log", ".marker"):
                dst = self.layout.jobs / spec.id / f"{m}{suffix}"
                dst.unlink(missing_ok=True)
                os.link(src_dir / f"{m}{suffix}", dst)
        spec.dedupe_of = earlier["job_id"]
        log.info("%s is byte-identical to %s; its results are republished", spec.name, earlier["job_id"])


def record_completed(journal: Journal, spec: JobSpec) -> None:
    """Index a completed job for dedupe."""
    write_json(
        journal.layout.dedupe / f"{dedupe_key(spec.sha256, spec.models)}.json",
        {"job_id": spec.id, "status": Status.COMPLETED.value},
    )
