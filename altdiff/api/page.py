"""The web page and its static files."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

WEB = Path(__file__).parent.parent / "web"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(WEB / "index.html")
