"""The OpenAI Batch output line: success, request error (4xx/5xx) and failure (response null).

Ids are derived from (job, model, line) so a recomputed result gets the same ids.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson


def request_ids(job_id: str, model: str, index: int) -> tuple[str, str]:
    h = blake2b(f"{job_id}/{model}/{index}".encode(), digest_size=12).hexdigest()
    return f"batch_req_{h}", f"req_{h}"


def success_line(custom_id: str, body: dict[str, Any], ids: tuple[str, str]) -> bytes:
    return orjson.dumps(
        {
            "id": ids[0],
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": ids[1], "body": body},
            "error": None,
        }
    )


def error_line(
    custom_id: str | None,
    status_code: int,
    message: str,
    ids: tuple[str, str],
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    return orjson.dumps(
        {
            "id": ids[0],
            "custom_id": custom_id,
            "response": {
                "status_code": status_code,
                "request_id": ids[1],
                "body": {"error": {"message": message, "type": type, "param": param, "code": code}},
            },
            "error": None,
        }
    )


def failure_line(custom_id: str | None, code: str, message: str, ids: tuple[str, str]) -> bytes:
    return orjson.dumps(
        {
            "id": ids[0],
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )
