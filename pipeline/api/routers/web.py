from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[2] / "static"

router = APIRouter(tags=["web"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The chat web page (plain HTML + JS; streams answers and shows citations)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")
