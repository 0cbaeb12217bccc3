"""The FastAPI app: OpenAI's /v1/files, /v1/batches and /v1/models over the folders, and `/`.

Uploads become drops (written the safe way into the inbox); every answer is read from state/ and
outbox/, so it works whether the daemon runs in this process or another.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from dropbox_runner.api import uploads
from dropbox_runner.api.edge import Edge
from dropbox_runner.api.edge import is_loopback as is_loopback  # `serve` asks it of its address
from dropbox_runner.api.store import Store, first_models, new_id
from dropbox_runner.config import Registry
from dropbox_runner.intake.manifest import expires_after_seconds, metadata_problem, window_seconds
from dropbox_runner.intake.submit import submit_file
from dropbox_runner.layout import Layout, OutboxFolder
from dropbox_runner.lines.fields import quote
from dropbox_runner.queue import catalog
from dropbox_runner.status import view as status_view

API_KEY_ENV = "DROPBOX_RUNNER_API_KEY"
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/score",
    "/v1/rerank",
)
PAGE = Path(__file__).with_name("page.html")
STATUS_MAP = {"queued": "validating"}  # our other statuses are OpenAI's own


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


def create_app(layout: Layout, registry: Registry, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="dropbox_runner", docs_url=None, redoc_url=None)
    store = Store(layout)
    limit = registry.settings.max_upload_bytes

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": str(exc), "type": exc.type, "param": exc.param, "code": exc.code}},
            status_code=exc.status,
        )

    # Host, Origin and the key are judged before any route (with a key, all but /healthz need it)
    app.add_middleware(Edge, api_key=api_key, allowed_hosts=registry.settings.allowed_hosts)

    # -- files -------------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        try:
            return await uploads.receive(request, store, limit)
        except uploads.UploadRefused as exc:
            raise ApiError(exc.status, str(exc), param=exc.param, code=exc.code) from None

    @app.get("/v1/files")
    def list_files() -> dict[str, Any]:
        return {"object": "list", "data": store.list_files(), "has_more": False}

    def output_file(file_id: str) -> tuple[dict[str, Any], Path] | None:
        kind, _, batch_id = file_id.partition("-")[2].partition("-")
        record = store.batch(batch_id) if kind in ("out", "err") else None
        if record is None:
            return None
        b = store.batch_json(record)
        if b is None or not b.get("output_folder"):  # not taken yet, or removed by retention
            return None
        published = layout.outbox_folder(b["output_folder"])
        path = (published.output if kind == "out" else published.errors)(record["model"])
        if not path.exists():
            return None
        st = path.stat()
        return {
            "id": file_id,
            "object": "file",
            "bytes": st.st_size,
            "created_at": int(st.st_mtime),
            "filename": path.name,
            "purpose": "batch_output",
            "status": "processed",
        }, path

    def find_file(file_id: str) -> tuple[dict[str, Any], Path]:
        meta = store.file_meta(file_id)
        if meta is not None:
            return meta, store.file_path(file_id)
        out = output_file(file_id)
        if out is None:
            raise ApiError(404, f"no file with id {file_id!r}", code="file_not_found")
        return out

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return find_file(file_id)[0]

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> FileResponse:
        return FileResponse(find_file(file_id)[1], media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        if not store.delete_file(file_id):
            raise ApiError(404, f"no file with id {file_id!r}", code="file_not_found")
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches -----------------------------------------------------------------------------------
    def api_batch(record: dict[str, Any]) -> dict[str, Any]:
        b = store.batch_json(record)
        model = record["model"]
        m = (b or {}).get("models", {}).get(model)
        if b is not None and m is None:  # rejected before the models ran
            status, counts = b["status"], b["request_counts"]
        elif m is not None:
            status, counts = m["status"], m["request_counts"]
        else:
            status, counts = "queued", {"total": 0, "completed": 0, "failed": 0}
        if record.get("cancel_requested") and status not in ("completed", "failed", "cancelled", "expired"):
            status = "cancelling"
        done_at = (m or {}).get("completed_at") or (b or {}).get("failed_at")
        folder = (b or {}).get("output_folder")
        has = lambda file: bool(folder) and file(layout.outbox_folder(folder), model).exists()  # noqa: E731
        errors = (b or {}).get("errors")
        used = (m or {}).get("usage") or {}
        prompt, completion = used.get("prompt_tokens", 0), used.get("completion_tokens", 0)
        return {
            "id": record["id"],
            "object": "batch",
            "endpoint": record["endpoint"],
            "input_file_id": record["input_file_id"],
            "completion_window": record["completion_window"],
            "status": STATUS_MAP.get(status, status),
            "created_at": record["created_at"],
            "in_progress_at": (b or {}).get("in_progress_at"),
            "completed_at": done_at if status == "completed" else None,
            "failed_at": done_at if status == "failed" else None,
            "cancelled_at": done_at if status == "cancelled" else None,
            "finalizing_at": None,
            "expires_at": (b or {}).get("expires_at"),
            "expired_at": (b or {}).get("expired_at") if status == "expired" else None,
            "cancelling_at": None,
            "output_file_id": f"file-out-{record['id']}" if has(OutboxFolder.output) else None,
            "error_file_id": f"file-err-{record['id']}" if has(OutboxFolder.errors) else None,
            "request_counts": counts,
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {
                    "cached_tokens": used.get("prompt_tokens_details", {}).get("cached_tokens", 0)
                },
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
            "metadata": record["metadata"],
            "errors": {
                "object": "list",
                "data": [
                    {"code": e.get("code"), "message": e.get("message"), "line": e.get("line"), "param": None}
                    for e in errors["data"]
                ],
            }
            if errors and status == "failed"
            else None,
            "model": model,
        }

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        file_id = body.get("input_file_id")
        meta = store.file_meta(file_id) if isinstance(file_id, str) else None
        if meta is None:
            raise ApiError(
                404, f"no file with id {quote(file_id)}", param="input_file_id", code="file_not_found"
            )
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        window = body.get("completion_window", "24h")
        if window_seconds(window) is None:
            raise ApiError(
                400, 'completion_window must be "24h", "30m", "90s" or seconds', param="completion_window"
            )
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ApiError(400, "metadata must be an object of strings", param="metadata")
        problem = metadata_problem(metadata)
        if problem:
            raise ApiError(400, problem, param="metadata")
        expires_after = body.get("output_expires_after")
        seconds = expires_after_seconds(expires_after) if expires_after is not None else None
        if isinstance(seconds, str):
            raise ApiError(400, seconds, param="output_expires_after")
        path = store.file_path(meta["id"])
        if metadata.get("models"):
            models = [m.strip() for m in metadata["models"].split(",") if m.strip()]
        else:
            named = first_models(path)
            if len(named) != 1:
                raise ApiError(
                    400,
                    "every line's body.model must name the same one model (or set metadata.models to 'a,b')",
                    param="input_file_id",
                )
            models = sorted(named)
        unknown = [m for m in models if m not in registry.models]
        if unknown:
            raise ApiError(
                400,
                f"unknown model {unknown[0]!r}; known models: {', '.join(registry.models)}",
                param="model",
                code="model_not_found",
            )
        ids = [new_id("batch") for _ in models]
        stem = ids[0]
        now = int(time.time())
        links = {"linked_batches": ",".join(ids)} if len(ids) > 1 else {}
        records = [
            {
                "id": i,
                "model": m,
                "outbox": stem,
                "input_file_id": meta["id"],
                "endpoint": endpoint,
                "completion_window": str(window),
                "created_at": now,
                "metadata": {**metadata, **links},
            }
            for i, m in zip(ids, models, strict=True)
        ]
        for r in records:
            store.save_batch(r)
        submit_file(
            layout,
            path,
            models,
            one_model_folder=False,
            stem=stem,
            metadata={**metadata, "api_batches": ",".join(ids)},
            completion_window=str(window),
            output_expires_seconds=seconds,
        )
        return api_batch(records[0])

    def get_record(batch_id: str) -> dict[str, Any]:
        record = store.batch(batch_id)
        if record is None:
            raise ApiError(404, f"no batch with id {batch_id!r}", code="batch_not_found")
        return record

    @app.get("/v1/batches")
    def list_batches(after: str | None = None, limit: int = 20) -> dict[str, Any]:
        records = store.list_batches()
        if after:
            ids = [r["id"] for r in records]
            records = records[ids.index(after) + 1 :] if after in ids else []
        page = records[: max(1, min(limit, 100))]
        data = [api_batch(r) for r in page]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(records) > len(page),
        }

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str) -> dict[str, Any]:
        return api_batch(get_record(batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        from dropbox_runner.jobs.operations import operate
        from dropbox_runner.queue.journal import Journal

        record = get_record(batch_id)
        journal = Journal(layout)
        job_id = catalog.find_job(layout, record["outbox"])
        if job_id is None:
            raise ApiError(
                409,
                "the batch has not been taken by the daemon yet; cancel it again shortly",
                code="batch_not_ready",
            )
        record["cancel_requested"] = True
        store.save_batch(record)
        operate(journal, journal.spec(job_id), "cancel")
        return api_batch(record)

    # -- models, health, page ----------------------------------------------------------------------
    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "dropbox_runner"}
                for name in registry.models
            ],
        }

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        return {"status": "ok", "daemon_running": status_view.daemon_running(layout)}

    @app.get("/metrics")
    def metrics() -> Response:
        from dropbox_runner.api import metrics as prometheus

        return Response(prometheus.render(layout), media_type=prometheus.CONTENT_TYPE)

    @app.get("/api/status")
    def status_json(page: int = 0, since: float | None = None) -> dict[str, Any]:
        return history_since(status_view.collect(layout, page=page), since)

    def job_id_of(ref: str) -> str:
        job_id = catalog.find_job(layout, ref)
        if job_id is None:
            raise ApiError(404, f"no job is named {quote(ref)}", code="job_not_found")
        return job_id

    @app.get("/api/jobs/{ref}")
    def job_json(ref: str) -> dict[str, Any]:
        detail = status_view.job_detail(layout, job_id_of(ref))
        if detail is None:
            raise ApiError(404, f"no job is named {quote(ref)}", code="job_not_found")
        return detail

    @app.post("/api/jobs/{ref}/{op}")
    def job_operation(ref: str, op: str) -> dict[str, Any]:
        from dropbox_runner.errors import RunnerError
        from dropbox_runner.jobs.operations import operate
        from dropbox_runner.queue.journal import Journal

        if op not in ("cancel", "retry"):
            raise ApiError(404, "the operations are cancel and retry", code="not_found")
        journal = Journal(layout)
        try:
            done, models = operate(journal, journal.spec(job_id_of(ref)), op)
        except RunnerError as exc:
            raise ApiError(409, str(exc), code="not_possible") from None
        return {"job": ref, "op": op, "done": done, "models": models}

    @app.get("/outbox/{folder}/{name}")
    def outbox_file(folder: str, name: str) -> FileResponse:
        try:  # a name the filesystem cannot hold (ENAMETOOLONG) is no such file either
            path = (layout.outbox / folder / name).resolve()
            found = path.parent.parent == layout.outbox.resolve() and not name.startswith(".")
            found = found and path.is_file()
        except OSError:
            found = False
        if not found:
            raise ApiError(404, "no such result file", code="not_found")
        return FileResponse(path, media_type="application/jsonl")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    return app


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


def resolve_api_key(registry: Registry) -> str | None:
    return os.environ.get(API_KEY_ENV) or registry.settings.api_key
