"""Receive buffers of the proxy's UDP sockets (plain CoAP and DTLS).

A UDP socket's receive buffer is all that holds datagrams between two turns of the event loop.
Linux gives a socket ``net.core.rmem_default`` (212,992 bytes on Debian), which a burst
overflows: in benchmark RB (BENCHMARKS.md) 4,000 devices whose NAT mappings changed at once sent
their next request within ~0.1 s and 3,200 of those first transmissions were dropped by the
kernel (the socket's ``RcvbufErrors``), each answered only after the device's CoAP
retransmission 2–3 s later (RFC 7252 §4.2). The proxy asks for a larger buffer
(``udp_receive_buffer``); the kernel caps the request at ``net.core.rmem_max`` without an
error, so the size actually granted is read back and a shortfall is logged once, naming the
sysctl to raise (docs/OPERATIONS.md, "Socket buffers").
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


def size_receive_buffer(sock: socket.socket, wanted: int, listener: str) -> int:
    """Ask for ``wanted`` bytes of receive buffer on ``sock`` (0: leave the kernel's default)
    and return what the socket has afterwards, as the kernel reports it (Linux reports twice
    the size asked for, the bookkeeping overhead included: socket(7), SO_RCVBUF)."""
    if wanted > 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        except OSError as exc:
            log.warning("%s: could not set SO_RCVBUF to %d bytes: %s", listener, wanted, exc)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux doubles the value set; other systems report it as set.
    if wanted > 0 and granted < wanted:
        log.warning(
            "%s: the kernel granted a %d-byte receive buffer of the %d asked for "
            "(udp_receive_buffer); raise net.core.rmem_max (sysctl -w "
            "net.core.rmem_max=%d) or a burst of datagrams may be dropped before the proxy "
            "reads them",
            listener,
            granted,
            wanted,
            wanted,
        )
    return granted
