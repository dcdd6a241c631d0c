from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from pipeline.api.deps import PrincipalDep, ServiceDep
from pipeline.api.schemas import ModelList, error_responses

router = APIRouter(tags=["models"])


class ModelListExtension(BaseModel):
    default_model: str  # what a request without `model` (or with model "raglora") is answered by


class ModelListWithDefault(ModelList):
    """OpenAI's model list plus a `raglora` extension object (clients ignore extra fields; the web page starts on
    the default model)."""

    raglora: ModelListExtension


@router.get("/v1/models", response_model=ModelListWithDefault, responses=error_responses(401, 429, 503))
async def list_models(principal: PrincipalDep, service: ServiceDep) -> dict:
    """One model name per available mode/stage, e.g. raglora-rag, raglora-rag+lora-<stage> for every trained stage."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "raglora"} for name in service.model_names()
        ],
        "raglora": {"default_model": service.default_model},
    }
