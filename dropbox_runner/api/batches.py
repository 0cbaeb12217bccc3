"""OpenAI's Batch API, `/v1/batches` (and `/v1/models`, the names a batch's lines may give): a batch
becomes a drop in the inbox, one API batch per model, answered from the job's batch.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request

from dropbox_runner.api.context import Context, Ctx
from dropbox_runner.api.envelope import ApiError
from dropbox_runner.api.openai_batch import to_openai_batch
from dropbox_runner.intake.manifest import expires_after_seconds, metadata_problem, window_seconds
from dropbox_runner.intake.submit import submit_file
from dropbox_runner.jobs.api_records import new_id
from dropbox_runner.jobs.operations import operate
from dropbox_runner.lines.fields import quote
from dropbox_runner.lines.parse import URLS, iter_raw_lines
from dropbox_runner.queue import catalog
from dropbox_runner.queue.journal import Journal

router = APIRouter()
ENDPOINTS = tuple(u for u in URLS if u.startswith("/v1/"))  # OpenAI's spelling of the URLs lines take


@router.post("/v1/batches")
async def create_batch(request: Request, ctx: Ctx) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    file_id = body.get("input_file_id")
    meta = ctx.records.file_meta(file_id) if isinstance(file_id, str) else None
    if meta is None:
        raise ApiError(404, f"no file with id {quote(file_id)}", param="input_file_id", code="file_not_found")
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
    path = ctx.records.file_path(meta["id"])
    models = batch_models(ctx, metadata, path)
    ids = [new_id("batch") for _ in models]
    now = int(time.time())
    links = {"linked_batches": ",".join(ids)} if len(ids) > 1 else {}
    records = [
        {
            "id": i,
            "model": m,
            "outbox": ids[0],
            "input_file_id": meta["id"],
            "endpoint": endpoint,
            "completion_window": str(window),
            "created_at": now,
            "metadata": {**metadata, **links},
        }
        for i, m in zip(ids, models, strict=True)
    ]
    for r in records:
        ctx.records.save_batch(r)
    submit_file(
        ctx.layout,
        path,
        models,
        one_model_folder=False,
        stem=ids[0],
        metadata={**metadata, "api_batches": ",".join(ids)},
        completion_window=str(window),
        output_expires_seconds=seconds,
    )
    return openai_batch(ctx, records[0])


def batch_models(ctx: Context, metadata: dict[str, str], path: Path) -> list[str]:
    """`metadata.models` ("a,b": one batch per model), else the one model every line names."""
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
    unknown = [m for m in models if m not in ctx.registry.models]
    if unknown:
        raise ApiError(
            400,
            f"unknown model {unknown[0]!r}; known models: {', '.join(ctx.registry.models)}",
            param="model",
            code="model_not_found",
        )
    return models


@router.get("/v1/batches")
def list_batches(ctx: Ctx, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    records = ctx.records.list_batches()
    if after:
        ids = [r["id"] for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    page = records[: max(1, min(limit, 100))]
    data = [openai_batch(ctx, r) for r in page]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(records) > len(page),
    }


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, ctx: Ctx) -> dict[str, Any]:
    return openai_batch(ctx, get_record(ctx, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, ctx: Ctx) -> dict[str, Any]:
    record = get_record(ctx, batch_id)
    journal = Journal(ctx.layout)
    job_id = catalog.find_job(ctx.layout, record["outbox"])
    if job_id is None:
        raise ApiError(
            409,
            "the batch has not been taken by the daemon yet; cancel it again shortly",
            code="batch_not_ready",
        )
    record["cancel_requested"] = True
    ctx.records.save_batch(record)
    operate(journal, journal.spec(job_id), "cancel")
    return openai_batch(ctx, record)


@router.get("/v1/models")
def list_models(ctx: Ctx) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "dropbox_runner"}
            for name in ctx.registry.models
        ],
    }


def get_record(ctx: Context, batch_id: str) -> dict[str, Any]:
    record = ctx.records.batch(batch_id)
    if record is None:
        raise ApiError(404, f"no batch with id {batch_id!r}", code="batch_not_found")
    return record


def openai_batch(ctx: Context, record: dict[str, Any]) -> dict[str, Any]:
    """The batch object, from the record, its job's batch.json and the output files there now."""
    batch = ctx.records.batch_json(record)
    has_output = ctx.records.output(record, batch, "out") is not None
    has_errors = ctx.records.output(record, batch, "err") is not None
    return to_openai_batch(record, batch, has_output=has_output, has_errors=has_errors)


def first_models(path: Path) -> set[str]:
    """The `body.model` values of a file's lines (streaming, each read capped at the daemon's
    MAX_LINE_BYTES; lines that are longer or do not parse are skipped)."""
    models: set[str] = set()
    with open(path, "rb") as f:
        for raw in iter_raw_lines(f):
            if raw.data is None:
                continue
            try:
                obj = orjson.loads(raw.data)
            except orjson.JSONDecodeError:
                continue
            body = obj.get("body") if isinstance(obj, dict) else None
            model = body.get("model") if isinstance(body, dict) else None
            if isinstance(model, str):
                models.add(model)
    return models
