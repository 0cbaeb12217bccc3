"""What `dropbox-runner status` shows, read from state/ alone: jobs, models, progress, the daemon.

Works whether or not the daemon runs; counts and rates come from the committed markers. It reads
the records as plain JSON (no pydantic), so the command answers in a fraction of a second.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any

from dropbox_runner.fsutil import read_json_or_none, write_json
from dropbox_runner.layout import Layout
from dropbox_runner.queue import catalog
from dropbox_runner.queue.lifecycle import Status, job_status
from dropbox_runner.status.history import read_history, recent_rates

RECENT_FINISHED = 20


LAST_WORDS_BYTES = 16 * 1024  # the end of daemon.log read for its last line


def daemon_running(layout: Layout) -> bool:
    """Whether a daemon holds the root's lock. A shared lock is asked for: it works on a read-only
    descriptor everywhere (NFS emulates flock with fcntl locks, and refuses an exclusive one on a
    read-only descriptor with EBADF), and it fails while the daemon holds its exclusive lock."""
    try:
        fd = os.open(layout.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


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
    m = marker or {}
    count, failed = m.get("count", 0), m.get("failed", 0)
    started, updated = m.get("started_at"), m.get("updated_at")
    final = Status(task["status"]).final
    end = task.get("completed_at") if final else (updated or now)
    elapsed = (end or now) - started if started else 0.0
    tps = m.get("completion_tokens", 0) / elapsed if elapsed > 0 else 0.0
    rate = count / elapsed if elapsed > 0 else 0.0
    remaining = spec["total"] - count
    eta = remaining / rate if rate > 0 and not final else None
    if live is not None:  # from the rate over the last minute: time spent waiting does not count
        eta = live.get("eta_seconds")
    elif task["status"] == "queued":
        eta = None  # waiting, or preempted: no rate to go by
    return {
        "model": task["model"],
        "status": task["status"],
        "done": count,
        "succeeded": count - failed,
        "total": spec["total"],
        "failed": failed + (remaining if final else 0),
        "tokens_per_second": round(tps, 1),
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "checkpoint_age_seconds": round(now - updated, 1) if updated else None,
        "usage": {
            "prompt_tokens": m.get("prompt_tokens", 0),
            "completion_tokens": m.get("completion_tokens", 0),
            "cached_tokens": m.get("cached_tokens", 0),
        },
        "load_seconds": task.get("load_seconds"),
        "error": task.get("error"),
        "group": (live or {}).get("group") or task.get("group"),
        "share": (live or {}).get("share"),
        "preemptions": task.get("preemptions", 0),
    }


def _shown(task: dict[str, Any]) -> Status:
    """A preempted task waits in the queue, and its job stays in progress (CONTRACT section 12)."""
    status = Status(task["status"])
    return Status.IN_PROGRESS if status == Status.QUEUED and task.get("preemptions") else status


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
    status = Status.FAILED if spec["rejected"] else job_status([_shown(t) for t in job.tasks])
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
    folder = layout.outbox / job["outbox"].split("/")[1]
    batch = read_json_or_none(folder / "batch.json") or {}
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    failed: dict[str, list[dict[str, Any]]] = {}
    for m in job["models"]:
        failed[m["model"]] = _first_failed(folder / f"{m['model']}.errors.jsonl")
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
        entry = read_json_or_none(layout.queue / key)
        if not isinstance(entry, dict):
            continue
        job_id, model = entry.get("job_id"), entry.get("model")
        task = read_json_or_none(layout.job_dir(job_id) / f"{model}.task.json") or {}
        if task.get("status") != "queued":
            continue  # running (its entry goes when it ends), or already ended
        if job_id not in names:
            names[job_id] = read_json_or_none(layout.job_dir(job_id) / "spec.json")
        spec = names[job_id] or {}
        queued_at = int(key.split("-", 2)[1]) / 1e9
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


def write_snapshot(layout: Layout, live: dict[str, Any]) -> None:
    """state/status.json: the daemon's own state (model loaded, task running, swaps) for `status`."""
    info = read_json_or_none(layout.daemon_info) or {}
    queue = len(os.listdir(layout.queue)) if layout.queue.exists() else 0
    write_json(
        layout.snapshot, {**info, "updated_at": time.time(), "queue_length": queue, **live}, durable=False
    )


def _fmt_eta(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_age(s: float | None) -> str:
    return "-" if s is None else f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m"


def bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def daemon_line(state: dict[str, Any]) -> str:
    snap = state["snapshot"]
    if not state["running"]:
        words = f" Its last words: {state['last_words']}" if state["last_words"] else ""
        return f"The daemon is not running.{words}"
    parts = [f"daemon pid {snap.get('pid')} on {snap.get('host')}"]
    if snap.get("loaded_model"):
        parts.append(
            f"model {snap['loaded_model']} loaded in {snap.get('load_seconds') or 0:.1f}s, "
            f"{snap.get('model_rss_mb') or 0:.0f} MB resident"
            + (f", {n} requests preempted by vLLM" if (n := snap.get("engine_preemptions")) else "")
        )
    elif snap.get("loading_model"):
        parts.append(f"loading {snap['loading_model']}")
    parts.append(f"watching the inbox ({snap.get('watch_mode')})")
    rates = state.get("recent_tokens_per_second") or {}
    if snap.get("loaded_model") in rates:
        parts.append(f"{rates[snap['loaded_model']]:.0f} tok/s over the last minute")
    return "; ".join(parts) + "."


def render_table(doc: dict[str, Any], bars: bool = False) -> str:
    lines = [daemon_line({**doc["daemon"], "recent_tokens_per_second": doc.get("recent_tokens_per_second")})]
    for name, problem in (doc["daemon"]["snapshot"].get("model_problems") or {}).items():
        lines.append(f"model {name} cannot run here: {problem}")
    if not doc["jobs"] and not doc.get("quarantined"):
        lines.append("No jobs yet: drop a .jsonl file into inbox/<model>/.")
        return "\n".join(lines)
    header = f"{'JOB':<28} {'MODEL':<16} {'STATUS':<12} {'DONE/TOTAL':>13} {'FAILED':>7} {'TOK/S':>9} {'ETA':>7} {'CKPT':>6}"
    lines.append(header)
    for job in doc["jobs"]:
        if job["rejected"]:
            lines.append(f"{job['name'][:28]:<28} {'-':<16} {'failed':<12} rejected: {job['rejected'][0]}")
            continue
        for i, m in enumerate(job["models"]):
            name = job["name"][:28] if i == 0 else ""
            done = f"{m['done']}/{m['total']}"
            line = (
                f"{name:<28} {m['model'][:16]:<16} {m['status']:<12} {done:>13} {m['failed']:>7} "
                f"{m['tokens_per_second']:>9.1f} {_fmt_eta(m['eta_seconds']):>7} "
                f"{_fmt_age(m['checkpoint_age_seconds']):>6}"
            )
            if bars:
                line += " " + bar(m["done"], m["total"])
            lines.append(line)
    if doc["hidden_finished"]:
        lines.append(f"... {doc['hidden_finished']} older finished jobs (--all shows them)")
    if doc.get("webhooks_undelivered"):
        lines.append(f"{doc['webhooks_undelivered']} webhook events not yet delivered (state/webhooks/)")
    for q in doc.get("quarantined", []):
        lines.append(f"quarantined {q['folder']}: {q['reason'][:200]}")
    return "\n".join(lines)


def render_detail(job: dict[str, Any]) -> str:
    lines = [f"{job['name']} ({job['id']}): {job['status']}", f"  results: {job['outbox']}"]
    if job["dedupe_of"]:
        lines.append(f"  same input as {job['dedupe_of']}: its results were republished")
    for reason in job["rejected"]:
        lines.append(f"  rejected: {reason}")
    for m in job["models"]:
        lines.append(
            f"  {m['model']}: {m['status']}, {m['done']}/{m['total']} done, {m['failed']} failed, "
            f"{m['tokens_per_second']} tok/s, ETA {_fmt_eta(m['eta_seconds'])}, "
            f"load {m['load_seconds'] if m['load_seconds'] is not None else '-'}s"
        )
        lines.append(f"    output: {job['outbox']}{m['model']}.jsonl")
        if m["failed"]:
            lines.append(f"    errors: {job['outbox']}{m['model']}.errors.jsonl")
        if m.get("group") is not None:
            share = f"{m['share']:.0%}" if m.get("share") is not None else "-"
            lines.append(
                f"    group {m['group']}, {share} of the model's completion tokens over the last minute"
            )
        if m.get("preemptions"):
            lines.append(f"    gave up its slot {m['preemptions']} times (preempted)")
        if m["error"]:
            lines.append(f"    error: {m['error']}")
    for e in job["line_errors"]:
        lines.append(f"  line {e['line']}: {e['message']}")
    return "\n".join(lines)
