"""The HTTP origin the conformance suite puts behind the proxy: one resource per resource the
ETSI CoAP#4 test descriptions name (TD_COAP_CORE, _BLOCK, _LINK), served for real by uvicorn.

It is an ordinary HTTP server and knows nothing of CoAP: what the TDs check on the CoAP side
(ETag, Location-Path/-Query, Max-Age, 2.03, 4.12, Block1/Block2) must come out of the proxy's
translation of plain HTTP (RFC 9110 validators and preconditions, Location, Range). The state
is in :class:`OriginState` so a test can look at what arrived and reset what it needs.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

TEXT = "text/plain; charset=utf-8"
XML = "application/xml"
LINK_FORMAT = "application/link-format"

# TD_COAP_BLOCK_*: "a large resource" — larger than one 1024-byte block, not a multiple of any
# block size, and every byte position recognisable (so a gap or a repeated block shows).
LARGE_BODY = b"".join(b"%05d|" % i for i in range(512))[:2500]
# The answer /large-post gives (TD_COAP_BLOCK_05: a large response to a large request).
LARGE_ANSWER = b"".join(b"<%04d>" % i for i in range(400))[:2300]
# How long /separate takes: longer than the proxy's ACK window in the suite (conftest), so
# the proxy must acknowledge first and answer separately (TD_COAP_CORE_09, 11, 16, 17).
SEPARATE_DELAY = 0.8


def strong_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:12] + '"'


def _etag_list(header: str | None) -> list[str]:
    """The entity tags of an If-Match / If-None-Match header (RFC 9110 §13.1.1, §13.1.2)."""
    if header is None:
        return []
    return [tag.strip() for tag in header.split(",") if tag.strip()]


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class OriginState:
    requests: list[Recorded] = field(default_factory=list)
    test_body: bytes = b"TD test resource"
    validate_body: bytes = b"validate v1"
    create1: bytes | None = None
    large_update: bytes = b""
    large_created: dict[str, bytes] = field(default_factory=dict)
    large_post_received: bytes = b""
    # /large honours `Range: bytes=` (206) when True; answers 200 with everything when False.
    ranges: bool = True
    # TD_COAP_OBS: the observable resources (path → body, media type; absent: deleted) and
    # the change feed's listeners (one queue per open event stream).
    observed: dict[str, tuple[bytes, str]] = field(default_factory=lambda: dict(OBSERVED))
    feeds: list[asyncio.Queue[str]] = field(default_factory=list)

    def reset(self) -> None:
        self.requests.clear()
        self.test_body = b"TD test resource"
        self.validate_body = b"validate v1"
        self.create1 = None
        self.observed = dict(OBSERVED)

    def change(self, path: str, body: bytes | None = None, media: str = TEXT) -> None:
        """Give ``path`` a new representation (None: delete it) and announce it on every open
        change feed, as the obs contract §3 says an origin does."""
        if body is None:
            self.observed.pop(path, None)
        else:
            self.observed[path] = (body, media)
        for queue in self.feeds:
            queue.put_nowait(path)

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]


# TD_COAP_OBS_*: /obs (CON notifications), /obs-non (NON), /obs-large (larger than a block).
OBS_LARGE = b"".join(b"[%04d]" % i for i in range(400))[:2100]
OBSERVED: dict[str, tuple[bytes, str]] = {
    "/obs": (b"obs 0", TEXT),
    "/obs-non": (b"obs-non 0", TEXT),
    "/obs-large": (OBS_LARGE, TEXT),
}


def _parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """A single `bytes=first-last` range (RFC 9110 §14.1.2); None for anything else."""
    if header is None or not header.startswith("bytes="):
        return None
    spec = header[len("bytes=") :]
    if "," in spec:
        return None
    first_text, _, last_text = spec.partition("-")
    if not first_text.isdigit():
        return None
    first = int(first_text)
    last = int(last_text) if last_text.isdigit() else length - 1
    return first, min(last, length - 1)


def build_app(state: OriginState) -> Starlette:
    async def record(request: Request) -> bytes:
        body = await request.body()
        state.requests.append(
            Recorded(
                request.method,
                request.url.path,
                request.url.query,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        return body

    async def test(request: Request) -> Response:
        body = await record(request)
        if request.method == "GET":
            return Response(state.test_body, media_type=TEXT)
        if request.method == "POST":
            # TD_COAP_CORE_18: the created resource is at /location1/location2/location3.
            return Response(b"created", 201, {"Location": "/location1/location2/location3"}, TEXT)
        if request.method == "PUT":
            state.test_body = body
            return Response(status_code=204)
        return Response(status_code=204)  # DELETE

    async def separate(request: Request) -> Response:
        await record(request)
        await asyncio.sleep(SEPARATE_DELAY)
        return Response(b"separate answer", media_type=TEXT)

    async def plain(request: Request) -> Response:
        await record(request)
        return Response(f"resource {request.url.path}".encode(), media_type=TEXT)

    async def query(request: Request) -> Response:
        await record(request)
        return Response(f"query {request.url.query}".encode(), media_type=TEXT)

    async def location_query(request: Request) -> Response:
        await record(request)
        return Response(status_code=201, headers={"Location": "/location-query?first=1&second=2"})

    async def multi_format(request: Request) -> Response:
        await record(request)
        accept = request.headers.get("accept", "")
        if accept.startswith(XML):
            return Response(b"<value>multi-format</value>", media_type=XML)
        return Response(b"multi-format", media_type=TEXT)

    async def validate(request: Request) -> Response:
        body = await record(request)
        etag = strong_etag(state.validate_body)
        if request.method == "GET":
            if etag in _etag_list(request.headers.get("if-none-match")):
                return Response(status_code=304, headers={"ETag": etag})
            return Response(state.validate_body, headers={"ETag": etag}, media_type=TEXT)
        # PUT: an atomic update when If-Match names the current tag (RFC 9110 §13.1.1).
        if_match = _etag_list(request.headers.get("if-match"))
        if if_match and etag not in if_match and "*" not in if_match:
            return Response(status_code=412)
        state.validate_body = body
        return Response(status_code=204, headers={"ETag": strong_etag(body)})

    async def create1(request: Request) -> Response:
        body = await record(request)
        if "*" in _etag_list(request.headers.get("if-none-match")) and state.create1 is not None:
            return Response(status_code=412)
        existed = state.create1 is not None
        state.create1 = body
        return Response(status_code=204 if existed else 201)

    async def large(request: Request) -> Response:
        await record(request)
        headers = {"ETag": strong_etag(LARGE_BODY)}
        wanted = _parse_range(request.headers.get("range"), len(LARGE_BODY))
        if state.ranges:
            headers["Accept-Ranges"] = "bytes"
            if wanted is not None:
                first, last = wanted
                if first >= len(LARGE_BODY):
                    return Response(
                        status_code=416, headers={"Content-Range": f"bytes */{len(LARGE_BODY)}"}
                    )
                headers["Content-Range"] = f"bytes {first}-{last}/{len(LARGE_BODY)}"
                return Response(LARGE_BODY[first : last + 1], 206, headers, TEXT)
        return Response(LARGE_BODY, headers=headers, media_type=TEXT)

    async def large_update(request: Request) -> Response:
        body = await record(request)
        if request.method == "PUT":
            state.large_update = body
            return Response(status_code=204)
        return Response(state.large_update, media_type=TEXT)

    async def large_create(request: Request) -> Response:
        body = await record(request)
        # The server chooses the new resource's segment (TD_COAP_BLOCK_04: "PS").
        state.large_created["new"] = body
        return Response(status_code=201, headers={"Location": "/large-create/new"})

    async def large_created(request: Request) -> Response:
        await record(request)
        body = state.large_created.get("new")
        if body is None:
            return Response(status_code=404)
        return Response(body, media_type=TEXT)

    async def large_post(request: Request) -> Response:
        state.large_post_received = await record(request)
        return Response(LARGE_ANSWER, media_type=TEXT)

    async def path_index(request: Request) -> Response:
        await record(request)
        return Response(b"</path/sub1>,</path/sub2>", media_type=LINK_FORMAT)

    async def observed(request: Request) -> Response:
        await record(request)
        found = state.observed.get(request.url.path)
        if found is None:
            return Response(status_code=404)
        body, media = found
        headers = {"ETag": strong_etag(body), "Cache-Control": "max-age=30"}
        wanted = _parse_range(request.headers.get("range"), len(body))
        if wanted is not None and wanted[0] < len(body):
            first, last = wanted
            headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
            return Response(body[first : last + 1], 206, headers, media)
        return Response(body, headers=headers, media_type=media)

    async def events(request: Request) -> Response:
        """The change feed (obs contract §3): an event stream of the paths that changed."""
        await record(request)
        queue: asyncio.Queue[str] = asyncio.Queue()
        state.feeds.append(queue)

        async def stream():  # type: ignore[no-untyped-def]
            try:
                yield b": open\n\n"
                while True:
                    try:
                        path = await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield f"event: changed\ndata: {path}\n\n".encode()
            finally:
                state.feeds.remove(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")

    every = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(
        routes=[
            Route("/test", test, methods=every),
            Route("/separate", separate, methods=["GET"]),
            Route("/seg1/seg2/seg3", plain, methods=["GET"]),
            Route("/query", query, methods=["GET"]),
            Route("/location-query", location_query, methods=["POST"]),
            Route("/location1/location2/location3", plain, methods=["GET"]),
            Route("/multi-format", multi_format, methods=["GET"]),
            Route("/validate", validate, methods=["GET", "PUT"]),
            Route("/create1", create1, methods=["PUT"]),
            Route("/large", large, methods=["GET"]),
            Route("/large-update", large_update, methods=["GET", "PUT"]),
            Route("/large-create", large_create, methods=["POST"]),
            Route("/large-create/new", large_created, methods=["GET"]),
            Route("/large-post", large_post, methods=["POST"]),
            Route("/path", path_index, methods=["GET"]),
            Route("/path/sub1", plain, methods=["GET"]),
            Route("/path/sub2", plain, methods=["GET"]),
            Route("/link1", plain, methods=["GET"]),
            Route("/link2", plain, methods=["GET"]),
            Route("/link3", plain, methods=["GET"]),
            Route("/rt/{name}", plain, methods=["GET"]),
            Route("/if/{name}", plain, methods=["GET"]),
            Route("/sz/{name}", plain, methods=["GET"]),
            Route("/obs", observed, methods=["GET"]),
            Route("/obs-non", observed, methods=["GET"]),
            Route("/obs-large", observed, methods=["GET"]),
            Route("/observe/events", events, methods=["GET"]),
        ]
    )
