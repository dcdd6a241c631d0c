from __future__ import annotations

from fastapi import APIRouter

from pipeline.api.deps import PrincipalDep, ServiceDep
from pipeline.api.schemas import ModelList, error_responses

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 429, 503))
async def list_models(principal: PrincipalDep, service: ServiceDep) -> dict:
    """One model name per available mode/stage, e.g. raglora-rag, raglora-rag+lora-<stage> for every trained stage."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "raglora"} for name in service.model_names()
        ],
    }
