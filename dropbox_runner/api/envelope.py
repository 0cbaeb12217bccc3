"""The one error envelope of the HTTP API, OpenAI's `{"error": {"message", "type", "param", "code"}}`:
for the routes' own refusals (`ApiError`), the edge's, and what FastAPI and Starlette refuse themselves
(no such route, a method a route does not take, a query parameter of the wrong type, a bug).

The status codes stay those each refusal had; docs/api-notes.md has the decisions.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}  # Starlette's own refusals


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


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """No such route (404) or a method the route does not take (405, with its `Allow` header)."""
    assert isinstance(exc, HTTPException)
    path = request.url.path[:200]
    message = {
        404: f"no route {path!r}",
        405: f"{path!r} does not take {request.method}",
    }.get(exc.status_code, str(exc.detail))
    code = STATUS_CODES.get(exc.status_code)
    return envelope(exc.status_code, message, code=code, headers=exc.headers)


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    """A query or path parameter FastAPI could not read as its type (`?limit=abc`): still a 422."""
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = (exc.errors() or [{}])[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = loc[-1] if len(loc) > 1 else None
    where = f"{loc[0]} parameter {param!r}" if param else "the request"
    return envelope(422, f"{where}: {first.get('msg', 'is not valid')}", param=param, code="invalid_value")


async def server_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug: the envelope for the client (instead of Starlette's plain text); Starlette re-raises
    the exception after this answer, so the server's log still has its traceback."""
    return envelope(
        500, "internal error; the server's log has the details", type="server_error", code="internal_error"
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
