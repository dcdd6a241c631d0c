"""FastAPI dependencies (Annotated), all reading what the lifespan put on `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from pipeline.answer import AnswerService
from pipeline.api.errors import ApiError
from pipeline.api.metrics import ApiMetrics
from pipeline.api.security import ANONYMOUS_PRINCIPAL, Principal, bearer_token
from pipeline.api.settings import ServeConfig


def get_settings(request: Request) -> ServeConfig:
    return request.app.state.settings


def get_service(request: Request) -> AnswerService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ApiError("the model is still loading; retry shortly", 503, code="not_ready")
    return service


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_principal(
    request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Principal:
    """Authenticate the Bearer key (when keys are configured) and charge its rate-limit bucket."""
    state = request.app.state
    principal = ANONYMOUS_PRINCIPAL
    if state.keyring:
        found = state.keyring.check(bearer_token(authorization))
        if found is None:
            state.metrics.auth_failures.inc()
            raise ApiError(
                "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = found
    wait = state.rate_limiter.acquire(principal.owner)
    if wait > 0:
        state.metrics.rate_limited.inc()
        raise ApiError(
            f"rate limit exceeded ({state.settings.rate_limit_per_minute} requests per minute); retry in {wait:.1f}s",
            429,
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    request.state.key_id = principal.key_id
    return principal


SettingsDep = Annotated[ServeConfig, Depends(get_settings)]
ServiceDep = Annotated[AnswerService, Depends(get_service)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
