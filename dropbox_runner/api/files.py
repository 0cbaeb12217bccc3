"""OpenAI's Files API: `/v1/files` uploads (the inputs), and the batches' output and error files
(`file-out-<batch>`, `file-err-<batch>`), read from the job's outbox folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from dropbox_runner.api import uploads
from dropbox_runner.api.context import Context, Ctx
from dropbox_runner.api.envelope import ApiError

router = APIRouter(prefix="/v1/files")
KINDS = ("out", "err")  # file-out-<batch>, file-err-<batch>


@router.post("")
async def upload(request: Request, ctx: Ctx) -> dict[str, Any]:
    try:
        return await uploads.receive(request, ctx.records, ctx.registry.settings.max_upload_bytes)
    except uploads.UploadRefused as exc:
        raise ApiError(exc.status, str(exc), param=exc.param, code=exc.code) from None


@router.get("")
def list_files(ctx: Ctx) -> dict[str, Any]:
    return {"object": "list", "data": ctx.records.list_files(), "has_more": False}


@router.get("/{file_id}")
def get_file(file_id: str, ctx: Ctx) -> dict[str, Any]:
    return find_file(ctx, file_id)[0]


@router.get("/{file_id}/content")
def file_content(file_id: str, ctx: Ctx) -> FileResponse:
    return FileResponse(find_file(ctx, file_id)[1], media_type="application/jsonl")


@router.delete("/{file_id}")
def delete_file(file_id: str, ctx: Ctx) -> dict[str, Any]:
    if not ctx.records.delete_file(file_id):
        raise no_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def no_file(file_id: str) -> ApiError:
    return ApiError(404, f"no file with id {file_id!r}", code="file_not_found")


def find_file(ctx: Context, file_id: str) -> tuple[dict[str, Any], Path]:
    meta = ctx.records.file_meta(file_id)
    if meta is not None:
        return meta, ctx.records.file_path(file_id)
    out = output_file(ctx, file_id)
    if out is None:
        raise no_file(file_id)
    return out


def output_file(ctx: Context, file_id: str) -> tuple[dict[str, Any], Path] | None:
    """An output or error file of a batch, while its job's outbox folder holds it."""
    kind, _, batch_id = file_id.partition("-")[2].partition("-")
    record = ctx.records.batch(batch_id) if kind in KINDS else None
    if record is None:
        return None
    path = ctx.records.output(record, ctx.records.batch_json(record), kind)
    if path is None:  # not taken or not ended yet, or removed by retention
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
