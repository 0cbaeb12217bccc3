"""The text of `dropbox-runner status`: the daemon's line, the table of jobs and the detail of one,
drawn from the documents `status.view` collects (nothing is read here).
"""

from __future__ import annotations

from typing import Any

from dropbox_runner.layout import OutboxFolder


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
        lines.append(f"    output: {job['outbox']}{OutboxFolder.output_name(m['model'])}")
        if m["failed"]:
            lines.append(f"    errors: {job['outbox']}{OutboxFolder.errors_name(m['model'])}")
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
