from __future__ import annotations

from fastapi import APIRouter, Request, Response

from pipeline.api.deps import MetricsDep
from pipeline.api.schemas import Health

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=None,
    responses={200: {"model": Health}, 503: {"model": Health, "description": "Still loading, or the load failed"}},
)
async def health(request: Request) -> Response:
    """Liveness + readiness: 200 when the model is loaded, 503 while loading or after a failed load."""
    from fastapi.responses import JSONResponse

    state = request.app.state
    service = getattr(state, "service", None)
    body = {
        "status": "ok" if service is not None else "loading",
        "model_loaded": service is not None,
        "index_loaded": bool(service is not None and service.index is not None),
        "stages": service.models.stage_names if service is not None else [],
        "default_model": service.default_model if service is not None else None,
        "adapter_strategy": service.models.strategy if service is not None else None,
        "batching": service.generator.batching if service is not None else None,
        "versions": service.versions if service is not None else {},
        "auth": bool(state.keyring),
    }
    return JSONResponse(body, status_code=200 if service is not None else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
