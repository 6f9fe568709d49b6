"""Real third-party CoAP clients, run as processes: libcoap's and aiocoap's."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

_RESPONSE_LINE = re.compile(r"t:(ACK|CON|NON) c:(\d\.\d\d)")


@dataclass
class ClientRun:
    returncode: int
    stdout: str
    stderr: str
    codes: list[str]


def _require(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found: install the Debian package {package}")
    return path


async def coap_client(
    *args: str, binary: str = "coap-client-notls", timeout: float = 10
) -> ClientRun:
    """Run libcoap's client with ``-v 6`` so every received message is printed; ``codes``
    lists the response codes (``"2.04"``) it received, in order."""
    exe = _require(binary, "libcoap3-bin")
    proc = await asyncio.create_subprocess_exec(
        exe, "-B", str(int(timeout)), "-v", "6", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout + 5)
    stdout = out.decode(errors="replace")
    codes = [m.group(2) for m in _RESPONSE_LINE.finditer(stdout) if m.group(2) != "0.00"]
    return ClientRun(proc.returncode or 0, stdout, err.decode(errors="replace"), codes)


async def aiocoap_client(*args: str, timeout: float = 15) -> ClientRun:
    """Run ``aiocoap-client`` from this venv; ``codes`` holds the code it reports."""
    exe = Path(sys.executable).parent / "aiocoap-client"
    if not exe.exists():
        raise AssertionError("aiocoap-client not installed in the venv: run `make install`")
    proc = await asyncio.create_subprocess_exec(
        str(exe), "-v", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    codes = re.findall(r"\b([245]\.\d\d)\b", stdout + stderr)
    return ClientRun(proc.returncode or 0, stdout, stderr, codes)


async def aiocoap_post_over_dtls(
    url: str, identity: str, key: str, payload: str, credentials_dir: Path
) -> ClientRun:
    """``aiocoap-client`` POSTing ``payload`` to a ``coaps://`` ``url`` with a PSK, given the way
    its documentation says: a credentials file naming the identity and the key as text."""
    scheme, _, rest = url.partition("://")
    base = f"{scheme}://{rest.split('/', 1)[0]}/*"
    credentials = credentials_dir / "credentials.json"
    credentials.write_text(
        json.dumps(
            {base: {"dtls": {"psk": {"ascii": key}, "client-identity": {"ascii": identity}}}}
        )
    )
    return await aiocoap_client(
        "--credentials", str(credentials), "-m", "POST", "--payload", payload, url
    )
