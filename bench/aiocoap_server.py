"""The aiocoap baseline (``python bench/aiocoap_server.py --port N``): ``/.well-known/core``
and a root resource whose POST does nothing but answer 2.04 Changed; under uvloop."""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiocoap
import aiocoap.resource as resource
import uvloop


class DoNothing(resource.Resource):
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED)


async def serve(host: str, port: int) -> None:
    site = resource.Site()
    wkc = resource.WKCResource(site.get_resources_as_linkheader)
    site.add_resource([".well-known", "core"], wkc)
    site.add_resource([], DoNothing())
    # UDP only: by default aiocoap would also open its tinydtls server (on port + 1), TCP, TLS
    # and WebSocket listeners, none of which the baseline uses.
    context = await aiocoap.Context.create_server_context(site, (host, port), transports=["udp6"])
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await context.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5683)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))
