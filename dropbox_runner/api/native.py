"""The runner's own routes, beside OpenAI's: the status page `/` and what it reads (`/api/status`,
`/api/jobs/...`, the result files under `/outbox/`), cancel and retry, `/healthz` and `/metrics`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from dropbox_runner.api import metrics as prometheus
from dropbox_runner.api.context import Context, Ctx
from dropbox_runner.api.envelope import ApiError
from dropbox_runner.errors import RunnerError
from dropbox_runner.jobs.operations import operate
from dropbox_runner.layout import daemon_running
from dropbox_runner.lines.fields import quote
from dropbox_runner.queue import catalog
from dropbox_runner.queue.journal import Journal
from dropbox_runner.status import view as status_view

router = APIRouter()
PAGE = Path(__file__).with_name("page.html")
OPERATIONS = ("cancel", "retry")


@router.get("/", response_class=HTMLResponse)
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/healthz")
def health(ctx: Ctx) -> dict[str, Any]:
    return {"status": "ok", "daemon_running": daemon_running(ctx.layout)}


@router.get("/metrics")
def metrics(ctx: Ctx) -> Response:
    return Response(prometheus.render(ctx.layout), media_type=prometheus.CONTENT_TYPE)


@router.get("/api/status")
def status_json(ctx: Ctx, page: int = 0, since: float | None = None) -> dict[str, Any]:
    return history_since(status_view.collect(ctx.layout, page=page), since)


@router.get("/api/jobs/{ref}")
def job_json(ref: str, ctx: Ctx) -> dict[str, Any]:
    detail = status_view.job_detail(ctx.layout, job_id_of(ctx, ref))
    if detail is None:
        raise no_job(ref)
    return detail


@router.post("/api/jobs/{ref}/{op}")
def job_operation(ref: str, op: str, ctx: Ctx) -> dict[str, Any]:
    if op not in OPERATIONS:
        raise ApiError(404, "the operations are cancel and retry", code="not_found")
    journal = Journal(ctx.layout)
    try:
        done, models = operate(journal, journal.spec(job_id_of(ctx, ref)), op)
    except RunnerError as exc:
        raise ApiError(409, str(exc), code="not_possible") from None
    return {"job": ref, "op": op, "done": done, "models": models}


@router.get("/outbox/{folder}/{name}")
def outbox_file(folder: str, name: str, ctx: Ctx) -> FileResponse:
    outbox = ctx.layout.outbox
    try:  # a name the filesystem cannot hold (ENAMETOOLONG) is no such file either
        path = (outbox / folder / name).resolve()
        found = path.parent.parent == outbox.resolve() and not name.startswith(".")
        found = found and path.is_file()
    except OSError:
        found = False
    if not found:
        raise ApiError(404, "no such result file", code="not_found")
    return FileResponse(path, media_type="application/jsonl")


def no_job(ref: str) -> ApiError:
    return ApiError(404, f"no job is named {quote(ref)}", code="job_not_found")


def job_id_of(ctx: Context, ref: str) -> str:
    job_id = catalog.find_job(ctx.layout, ref)
    if job_id is None:
        raise no_job(ref)
    return job_id


def history_since(doc: dict[str, Any], since: float | None) -> dict[str, Any]:
    """With `since` (the `t` of the last point a page has), only the newer points (`full: false`); the
    whole history if `since` is newer than every point (the history began again, or the clock went
    back). Loads and swaps are few (at most 200 each) and always sent whole."""
    history = doc["history"]
    points = history["points"]
    newer = [p for p in points if p["t"] > since] if since is not None else points
    full = since is None or not points or points[-1]["t"] < since
    history["points"], history["full"] = points if full else newer, full
    return doc
