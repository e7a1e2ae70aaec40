"""Error responses: every body is valid JSON whatever the request held (NaN, lone surrogates, deep nesting,
megabytes), `detail` of a 422 is always the array naming the request field, and a server error is a 500
with its traceback logged."""

from __future__ import annotations

import logging
import reprlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import webui
from .worker import QueueFull

logger = logging.getLogger("altdiff")

MAX_EXCERPT = 200  # characters of a client's value quoted back in an error or a header

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 80, 80, 4, 4


def excerpt(value: object) -> str:
    """A short, ASCII-safe quote of a client's value (reprlib bounds depth and length)."""
    return ascii(value)[:MAX_EXCERPT] if isinstance(value, str) else _safe(_repr.repr(value))


def _safe(text: str) -> str:
    """Text that encodes as UTF-8 (a lone surrogate becomes \\udXXX), at most MAX_EXCERPT characters."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_EXCERPT * 4]


def _detail(field: str, message: str, kind: str = "value_error") -> list[dict]:
    return [{"type": kind, "loc": ["body", *(field.split(".") if field else [])], "msg": _safe(message)}]


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        detail = [{"type": err.get("type", "value_error"), "loc": [_safe(str(x)) for x in err.get("loc", ())],
                   "msg": _safe(err.get("msg", "")), **({"input": excerpt(err["input"])} if "input" in err else {})}
                  for err in e.errors()[:20]]
        return JSONResponse({"detail": detail}, 422)

    @app.exception_handler(webui.FieldError)
    async def field_error(request: Request, e: webui.FieldError):
        return JSONResponse({"detail": _detail(e.field, e.message)}, 422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, 503, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):  # the webui's JSON shape for server errors
        logger.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": type(e).__name__, "detail": _safe(str(e))}, 500)
