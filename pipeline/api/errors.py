"""Every error leaves the API as OpenAI-shaped JSON: {"error": {"message", "type", "code", "param"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.answer import UnknownModel
from pipeline.store import ConversationNotFound, StoreError
from raglora.errors import RagloraError

log = logging.getLogger("raglora.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


# What clients see when the conversation database fails; the detail (with the server's file path) is only logged.
STORE_UNAVAILABLE = "the conversation store is unavailable (disk full or damaged database); retry later"


class ApiError(RagloraError):
    """A RagloraError with an HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.headers = headers


def error_response(
    status: int, message: str, *, code: str | None = None, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {
        "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "code": code, "param": param}
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON", None
    parts = []
    param = None
    for e in errors[:3]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {e.get('msg')}")
    return 422, "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, str(exc), code=exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel):
        return error_response(404, str(exc), code="model_not_found", param="model")

    @app.exception_handler(ConversationNotFound)
    async def _no_conversation(request: Request, exc: ConversationNotFound):
        return error_response(404, str(exc), code="conversation_not_found")

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError):
        log.error("conversation store failed", extra={"event": "store_error", "error": str(exc)})
        return error_response(503, STORE_UNAVAILABLE, code="store_unavailable")

    @app.exception_handler(RagloraError)
    async def _raglora(request: Request, exc: RagloraError):
        return error_response(400, str(exc).splitlines()[0] if str(exc) else "bad request")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        status, message, param = _validation_message(exc)
        return error_response(status, message, code="invalid_json" if status == 400 else "invalid_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception(
            "unhandled error", extra={"event": "error", "error": type(exc).__name__, "path": request.url.path}
        )
        return error_response(500, "internal server error", code="internal_error")
