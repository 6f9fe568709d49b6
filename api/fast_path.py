"""``POST /ingest/batch`` from the proxy, served before FastAPI's router.

The batch route is the one the proxy calls for every group of device messages, and FastAPI's
routing and dependency resolution cost more than the route's own code (docs/ARCHITECTURE.md,
"The proxy's batch call skips FastAPI's router"). This middleware answers the common case
itself — the proxy's token is right and the body has a declared length within the
limit — by calling the same :func:`api.routes.ingest.answer_batch` the route calls, with the
same objects from ``app.state`` the route's dependencies read (api/deps.py). Everything else
(no or wrong token, no Content-Length, too large, another layout, another path) goes to
FastAPI untouched, so every error is still answered by the route and documented in /docs. An
:class:`ApiError` raised while answering is rendered as the app's error handler renders it.

It runs whatever the app's ``dependency_overrides`` hold, as in production: tests give the
batch call their fakes through ``create_app(store=, publisher=, idempotency=)``, and
tests/api/test_fast_path.py holds both ways to the same answers, byte for byte.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError
from api.routes.ingest import answer_batch, batch_body_limit, publish_budget
from api.settings import ApiSettings
from policies.batch import BATCH_CONTENT_TYPE
from policies.forwarding import TIMEOUT_HEADER, TOKEN_HEADER

BATCH_PATH = "/ingest/batch"
_TOKEN = TOKEN_HEADER.lower().encode("latin-1")
_TIMEOUT = TIMEOUT_HEADER.lower().encode("latin-1")
_BATCH_TYPE = BATCH_CONTENT_TYPE.encode("latin-1")


class BatchFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != BATCH_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        settings: ApiSettings = state.settings
        accepted = _accepted(scope, settings)
        if accepted is None:
            await self.app(scope, receive, send)
            return
        length, proxy_timeout = accepted
        body = await _read(receive, length)
        if body is None:
            return  # the client went away before sending its body
        try:
            response: Response = await answer_batch(
                body,
                settings,
                state.admission,
                state.publisher,
                state.idempotency,
                publish_budget(proxy_timeout),
                templates=state.templates,
                store=state.store,
            )
        except ApiError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
        await response(scope, receive, send)


def _accepted(scope: Scope, settings: ApiSettings) -> tuple[int, bytes | None] | None:
    """The declared body length and the proxy's timeout header if this call may take the fast
    path, else None."""
    if settings.proxy_token is None:
        return None
    token: bytes | None = None
    length: bytes | None = None
    proxy_timeout: bytes | None = None
    content_type: bytes | None = None
    for name, value in scope["headers"]:
        if name == _TOKEN:
            token = value
        elif name == b"content-length":
            length = value
        elif name == _TIMEOUT:
            proxy_timeout = value
        elif name == b"content-type":
            content_type = value
    if token is None or not hmac.compare_digest(token, settings.proxy_token.encode()):
        return None
    if length is None or not length.isdigit() or content_type != _BATCH_TYPE:
        return None  # the route answers what is unusual (another layout: 415)
    declared = int(length)
    return (declared, proxy_timeout) if declared <= batch_body_limit(settings) else None


async def _read(receive: Receive, length: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > length:
            break  # more than declared: the server's parser would not allow it; be safe
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
