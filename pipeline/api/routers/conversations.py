from __future__ import annotations

import asyncio

from fastapi import APIRouter

from pipeline.api.deps import PrincipalDep, ServiceDep
from pipeline.api.errors import ApiError
from pipeline.api.schemas import Conversation, error_responses
from pipeline.store import ConversationNotFound

router = APIRouter(tags=["conversations"])


@router.get(
    "/v1/conversations/{conversation_id}",
    response_model=Conversation,
    responses=error_responses(401, 404, 422, 429, 503),
)
async def get_conversation(conversation_id: str, principal: PrincipalDep, service: ServiceDep) -> dict:
    """The (redacted) transcript and hand-off tickets; 404 unless the caller's key owns the conversation."""
    if service.store is None:
        raise ApiError("conversations are not stored by this server", 404, code="conversation_not_found")
    try:
        return await asyncio.to_thread(service.store.transcript, conversation_id, principal.owner)
    except ConversationNotFound:
        raise ApiError(f"conversation {conversation_id} not found", 404, code="conversation_not_found") from None
