"""The aiocoap baseline: ``/.well-known/core`` (``WKCResource``) and a root resource whose POST
does nothing but answer 2.04 Changed. Run under uvloop when available.

    python -m bench.aiocoap_server --host 127.0.0.1 --port 5683
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import aiocoap
import aiocoap.resource as resource


class DoNothing(resource.Resource):
    """POST → 2.04 Changed, nothing else."""

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED)


async def serve(host: str, port: int) -> None:
    site = resource.Site()
    site.add_resource(
        [".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader)
    )
    site.add_resource([], DoNothing())
    # UDP only: by default aiocoap would also open its tinydtls server (on port + 1), TCP, TLS
    # and WebSocket listeners, none of which the baseline uses.
    context = await aiocoap.Context.create_server_context(
        site, bind=(host, port), transports=["udp6"]
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await context.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5683)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
