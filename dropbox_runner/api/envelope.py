"""The one error envelope of the HTTP API, OpenAI's `{"error": {"message", "type", "param", "code"}}`:
for the routes' own refusals (`ApiError`) and the edge's.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse


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


def envelope(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return envelope(exc.status, str(exc), type=exc.type, param=exc.param, code=exc.code)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
