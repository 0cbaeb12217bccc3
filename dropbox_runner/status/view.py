"""What `dropbox-runner status`, the page and /metrics show, read from state/ alone: jobs, models,
progress, the queue, the daemon (its text is status.render's).

Works whether or not the daemon runs; counts and rates come from the committed markers (queue.counts
does the arithmetic). It reads the records as plain JSON (no pydantic), so the command answers in a
fraction of a second.
"""

from __future__ import annotations

import os
import time
from typing import Any

from dropbox_runner.fsutil import read_json_or_none
from dropbox_runner.layout import Layout, daemon_running
from dropbox_runner.queue import catalog
from dropbox_runner.queue.counts import shown_job_status, task_counts
from dropbox_runner.queue.keys import QueueKey
from dropbox_runner.status.history import read_history, recent_rates

RECENT_FINISHED = 20


LAST_WORDS_BYTES = 16 * 1024  # the end of daemon.log read for its last line


def last_line(path: os.PathLike[str], limit: int = LAST_WORDS_BYTES) -> str | None:
    """The last non-empty line of a file, reading only its last `limit` bytes."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            lines = f.read(limit).decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return None
    lines = [x.rstrip() for x in lines if x.strip()]
    return lines[-1] if lines else None


def daemon_state(layout: Layout) -> dict[str, Any]:
    """Whether a daemon holds the root, its snapshot, and its last words if it is gone."""
    snapshot = read_json_or_none(layout.snapshot) or {}
    running = daemon_running(layout)
    last_words = None if running else last_line(layout.log)
    return {"running": running, "snapshot": snapshot, "last_words": last_words}


def model_row(
    spec: dict[str, Any],
    task: dict[str, Any],
    marker: dict[str, Any] | None,
    now: float,
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A task's row; `live` is the daemon's word on it while it runs (group, share, recent ETA)."""
    counts = task_counts(spec["total"], task["status"], task.get("completed_at"), marker, now)
    # while it runs, the ETA is the daemon's, from the rate over the last minute: waiting does not count
    eta = live.get("eta_seconds") if live is not None else counts["eta_seconds"]
    return {
        "model": task["model"],
        "status": task["status"],
        "done": counts["done"],
        "succeeded": counts["succeeded"],
        "total": spec["total"],
        "failed": counts["failed"],
        "tokens_per_second": counts["tokens_per_second"],
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "checkpoint_age_seconds": counts["checkpoint_age_seconds"],
        "usage": counts["usage"],
        "load_seconds": task.get("load_seconds"),
        "error": task.get("error"),
        "group": (live or {}).get("group") or task.get("group"),
        "share": (live or {}).get("share"),
        "preemptions": task.get("preemptions", 0),
    }


def job_view(
    layout: Layout, job_id: str, now: float, live: dict[tuple[str, str], dict] | None = None
) -> dict[str, Any] | None:
    """One job as status shows it, or None if it is gone or half made."""
    job = catalog.read_job(layout, job_id)
    if job is None:
        return None
    spec = job.spec
    live = live or {}
    models = [
        model_row(spec, t, job.markers.get(t["model"]), now, live.get((job_id, t["model"])))
        for t in job.tasks
    ]
    status = shown_job_status(
        bool(spec["rejected"]), [(t["status"], t.get("preemptions")) for t in job.tasks]
    )
    return {
        "id": spec["id"],
        "name": spec["name"],
        "outbox": f"outbox/{spec['outbox']}/",
        "status": status.value,
        "created_at": spec["created_at"],
        "total": spec["total"],
        "priority": spec["priority"],
        "models": models,
        "rejected": spec["rejected"],
        "dedupe_of": spec.get("dedupe_of"),
        "line_errors": spec.get("line_errors", [])[:10],
    }


def live_tasks(state: dict[str, Any]) -> dict[tuple[str, str], dict]:
    """The running daemon's word on each task its model process holds, by (job id, model)."""
    running = state["snapshot"].get("running") if state["running"] else None
    if not isinstance(running, list):
        return {}
    return {(r["job_id"], r["model"]): r for r in running if isinstance(r, dict) and "job_id" in r}


def collect(
    layout: Layout, *, show_all: bool = False, with_history: bool = True, page: int = 0
) -> dict[str, Any]:
    """Every live job, and the finished ones newest first (RECENT_FINISHED a page; all with show_all)."""
    now = time.time()
    active = catalog.active_ids(layout)
    finished = catalog.job_ids(layout.archive)
    start = 0 if show_all else max(0, page) * RECENT_FINISHED
    hidden = 0 if show_all else max(0, len(finished) - start - RECENT_FINISHED)
    finished = finished if show_all else finished[start : start + RECENT_FINISHED]
    state = daemon_state(layout)
    live = live_tasks(state)
    views = (job_view(layout, j, now, live) for j in active + finished)
    history = read_history(layout)
    return {
        "root": str(layout.root),
        "daemon": state,
        "jobs": [v for v in views if v is not None],
        "hidden_finished": hidden,
        "finished_total": len(catalog.job_ids(layout.archive)),
        "quarantined": catalog.quarantined(layout),
        "queue": queue_view(layout, now),
        "webhooks_undelivered": catalog.undelivered_events(layout),
        "recent_tokens_per_second": recent_rates(history),
        **({"history": {k: history[k] for k in ("points", "loads", "swaps")}} if with_history else {}),
        "queue_length": len([k for k in os.listdir(layout.queue) if not k.startswith(".")])
        if layout.queue.exists()
        else 0,
    }


FAILED_LINES_SHOWN = 20


def job_detail(layout: Layout, job_id: str) -> dict[str, Any] | None:
    """One job for the page: its view, batch.json's errors, the first failed lines of each model and
    the files to download."""
    job = job_view(layout, job_id, time.time(), live_tasks(daemon_state(layout)))
    if job is None:
        return None
    published = layout.outbox_folder(job["outbox"].split("/")[1])
    folder = published.path
    batch = read_json_or_none(published.batch) or {}
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    failed: dict[str, list[dict[str, Any]]] = {}
    for m in job["models"]:
        failed[m["model"]] = _first_failed(published.errors(m["model"]))
    return {
        **job,
        "batch": {k: batch.get(k) for k in ("status", "request_counts", "errors", "expires_at", "metadata")},
        "failed_lines": failed,
        "files": [{"name": n, "url": f"/outbox/{folder.name}/{n}"} for n in files],
    }


def _first_failed(path: os.PathLike) -> list[dict[str, Any]]:
    import orjson

    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if len(out) >= FAILED_LINES_SHOWN:
                    break
                try:
                    x = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                response = x.get("response") or {}
                error = (response.get("body") or {}).get("error") or x.get("error") or {}
                out.append(
                    {
                        "custom_id": x.get("custom_id"),
                        "status": response.get("status_code"),
                        "code": error.get("code"),
                        "message": error.get("message"),
                    }
                )
    except FileNotFoundError:
        pass
    return out


def queue_view(layout: Layout, now: float) -> list[dict[str, Any]]:
    """The tasks waiting, in the order their entries sort (priority, then arrival): job, model,
    priority, wait.

    The scheduler takes them in this order, except that work for the loaded model goes first within
    the same priority, for at most max_swap_delay_seconds.
    """
    try:
        keys = sorted(k for k in os.listdir(layout.queue) if not k.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    names: dict[str, dict[str, Any] | None] = {}
    for key in keys:
        entry = read_json_or_none(layout.queue_entry(key))
        if not isinstance(entry, dict):
            continue
        job_id, model = entry.get("job_id"), entry.get("model")
        task = read_json_or_none(layout.job(job_id).task(model)) or {}
        if task.get("status") != "queued":
            continue  # running (its entry goes when it ends), or already ended
        if job_id not in names:
            names[job_id] = read_json_or_none(layout.job(job_id).spec)
        spec = names[job_id] or {}
        queued_at = QueueKey.parse(key).queued_at
        out.append(
            {
                "job_id": job_id,
                "name": spec.get("name"),
                "outbox": spec.get("outbox"),
                "model": model,
                "priority": spec.get("priority", 0),
                "waiting_seconds": round(max(0.0, now - queued_at), 1),
            }
        )
    return out
