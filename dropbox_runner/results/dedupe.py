"""Dedupe: a drop whose results are already known is republished instead of run again.

The key covers everything that decides results: the bytes, the models, the manifest's defaults
and each model's entry in models.yaml (an adapter's: its base's, its own and its folder's files). Results are copied, never shared: a retry of the earlier
job must not change the later one.
"""

from __future__ import annotations

import logging
from hashlib import blake2b
from pathlib import Path

import orjson

from dropbox_runner.config import Registry
from dropbox_runner.fsutil import copy_atomic, folder_digest, read_json_or_none, write_json
from dropbox_runner.layout import JobFolder
from dropbox_runner.queue.journal import JobSpec, Journal

log = logging.getLogger("dropbox_runner.results.dedupe")


def fingerprints(registry: Registry, root: Path, models: list[str]) -> dict[str, str]:
    """What decides each model's results, as a digest: its entry; for an adapter, its base's entry,
    its own, and the bytes of every file in its folder (new weights run again)."""
    out = {}
    for name in models:
        model = registry.models[name]
        base = registry.models.get(model.base) if model.base is not None else None
        if model.base is None:
            out[name] = model.fingerprint()
            continue
        parts = [base.fingerprint() if base else None, model.fingerprint()]
        parts.append(folder_digest(model.adapter_folder(root)))
        out[name] = blake2b(orjson.dumps(parts), digest_size=12).hexdigest()
    return out


def dedupe_key(spec: JobSpec) -> str:
    decides = {
        "models": spec.models,
        "defaults": spec.defaults,
        "fingerprints": {m: spec.fingerprints.get(m) for m in spec.models},
    }
    digest = blake2b(orjson.dumps(decides, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest()
    return f"{spec.sha256}-{digest}"


def reuse(journal: Journal, spec: JobSpec) -> bool:
    """Copy a completed twin's committed results into this job's folder; True if there was one."""
    earlier = read_json_or_none(journal.layout.dedupe_entry(dedupe_key(spec)))
    if not isinstance(earlier, dict) or not isinstance(earlier.get("job_id"), str):
        return False
    source, target = journal.layout.job(earlier["job_id"]), journal.layout.job(spec.id)
    files = [(f(source, m), f(target, m)) for m in spec.models for f in (JobFolder.log, JobFolder.marker)]
    if not all(src.is_file() for src, _ in files):
        return False
    for src, dst in files:  # each log before its marker, so a marker never points past its log
        copy_atomic(src, dst)
    spec.dedupe_of = earlier["job_id"]
    log.info(
        "%s is byte-identical to %s, for the same models, defaults and model entries; its results are "
        "republished",
        spec.name,
        earlier["job_id"],
    )
    return True


def remember(journal: Journal, spec: JobSpec) -> None:
    """Index a completed job for dedupe."""
    write_json(journal.layout.dedupe_entry(dedupe_key(spec)), {"job_id": spec.id})


def forget(journal: Journal, spec: JobSpec) -> None:
    """Drop the index entry of a job that is removed, if it points to it."""
    path = journal.layout.dedupe_entry(dedupe_key(spec))
    entry = read_json_or_none(path)
    if isinstance(entry, dict) and entry.get("job_id") == spec.id:
        path.unlink(missing_ok=True)
