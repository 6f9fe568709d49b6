"""The proxy the conformance modules start: real, in process, plain UDP on 127.0.0.1.

The proxy's ACK window is short (``ACK_WINDOW``) and the origin's /separate takes longer
(origin.SEPARATE_DELAY), so the separate-response TDs see an empty ACK first without waiting a
second per test.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings

ACK_WINDOW = 0.3
# The block size the suite configures (RFC 7959 §2.2 SZX 6); the default too (issue 13 §2).
BLOCK_SIZE = 1024


@contextlib.asynccontextmanager
async def running_proxy(
    policy_dir: Path, policy: str, base_url: str, **settings: Any
) -> AsyncIterator[RunningProxy]:
    path = policy_dir / "policy.toml"
    path.write_text(policy)
    proxy = await start_proxy(
        ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port=None,
            upstream=base_url,
            policy=str(path),
            upstream_timeout=5.0,
            ack_window=ACK_WINDOW,
            block_size=BLOCK_SIZE,
            **settings,
        )
    )
    try:
        yield proxy
    finally:
        await proxy.close()
