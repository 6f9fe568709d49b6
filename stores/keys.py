"""Redis key schema shared by every replica of the proxy and the API.

All keys live under one prefix so a deployment can share a Redis with other software. Keys
that must be touched together in one transaction carry the same hash tag ``{...}`` so they
land on one Redis Cluster slot.
"""

from __future__ import annotations

DEFAULT_PREFIX = "cb"


def device_key(iccid: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Hash holding one device's attributes, named by its id (= PSK identity; a SIM's id is
    its ICCID)."""
    return f"{prefix}:{{dev}}:device:{iccid}"


def device_ip_key(ip: str, prefix: str = DEFAULT_PREFIX) -> str:
    """String mapping a SIM's IP address to its id (the SIM-as-an-identity index)."""
    return f"{prefix}:{{dev}}:ip:{ip}"


def device_imei_key(imei: str, prefix: str = DEFAULT_PREFIX) -> str:
    """String mapping a device's IMEI to its id (the managed-PSK profile names a device by id
    or IMEI). Same ``{dev}`` slot as the hash, so one transaction writes both."""
    return f"{prefix}:{{dev}}:imei:{imei}"


def device_set_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Set of every registered device id (for listing)."""
    return f"{prefix}:{{dev}}:devices"


def dedup_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """The proxy's ledger records (stores/ledger.py): one per CoAP exchange, named by
    :func:`dedup_key`."""
    return f"{prefix}:dd:"


def dedup_key(ip: str, port: int, mid: int, identity: str | None = None) -> str:
    """One CoAP exchange as RFC 7252 §4.5 identifies it: the peer endpoint and the MID. Over
    DTLS the peer is its PSK identity (docs/CONTRACT.md §5), which survives a change of
    address/port."""
    if identity is not None:
        return f"id:{identity}:{mid}"
    return f"{ip}:{port}:{mid}"


def psk_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """Pub/sub channel on which the API announces a changed, revoked or deleted PSK; the
    message is the ICCID (= PSK identity). Proxies re-read that device's ``psk`` field."""
    return f"{prefix}:psk-changes"


def idempotency_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """The API's ledger records (stores/ledger.py): one per Idempotency-Key it processed."""
    return f"{prefix}:idem:"


def block_transfer_key(transfer: str, prefix: str = DEFAULT_PREFIX) -> str:
    """A request body being reassembled from Block1 blocks (RFC 7959 §2.5); ``transfer`` is the
    block-wise layer's digest of peer, method, URI and Request-Tags. The ``{blk}`` hash tag
    keeps a transfer and the sets bounding it on one Redis Cluster slot (one script call)."""
    return f"{prefix}:{{blk}}:t:{transfer}"


def block_peer_key(peer: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Sorted set of one peer's transfers in progress (score: expiry, ms): the per-peer cap."""
    return f"{prefix}:{{blk}}:peer:{peer}"


def block_index_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Sorted set of every transfer in progress (score: expiry, ms): the global cap."""
    return f"{prefix}:{{blk}}:all"


def changes_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """Pub/sub channel on which an API replica announces a changed origin resource (the
    message is its path, e.g. ``/commands/<iccid>``); every API replica relays it to the
    change feeds it serves (docs/API.md, "Commands and the change feed")."""
    return f"{prefix}:changes"


def command_keys(iccid: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, str, str]:
    """One device's command queue (stores/queue.py): the records hash, the pending ids by
    sequence, the pending ids by expiry, the finished ids by the time they finished. The
    ``{cmd:<iccid>}`` hash tag puts a device's four keys on one Redis Cluster slot, so one
    script call changes them atomically; devices spread over the slots."""
    base = f"{prefix}:{{cmd:{iccid}}}"
    return f"{base}:rec", f"{base}:pending", f"{base}:expiry", f"{base}:done"


def firmware_meta_key(version: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Hash of one firmware version's current image (stores/firmware.py): its generation,
    size, sha256, creation time and chunk size. The ``{fw:<version>}`` hash tag puts it and
    its chunks on one Redis Cluster slot (one script call switches them); versions spread over
    the slots."""
    return f"{prefix}:{{fw:{version}}}:meta"


def firmware_chunk_key(
    version: str, generation: str, index: int, prefix: str = DEFAULT_PREFIX
) -> str:
    """Chunk ``index`` of one stored copy (``generation``) of a firmware image."""
    return f"{prefix}:{{fw:{version}}}:{generation}:{index}"


def firmware_index_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Set of every stored firmware version (for listing only)."""
    return f"{prefix}:fw:versions"


def presence_keys(prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """Device presence (stores/presence.py): the sorted set of online devices scored by the
    time each goes offline, and the hash device → when its last counted message arrived. One
    ``{presence}`` hash tag: every step is one script on one Redis Cluster slot."""
    base = f"{prefix}:{{presence}}"
    return f"{base}:online", f"{base}:seen"


def registry_keys(prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """The signed-session profile's registry (stores/registry.py): the hash of products
    (productKey → record) and the prefix of each product's hash of devices (deviceKey →
    record). One ``{reg}`` hash tag: a device is created or a product deleted in one script,
    on one Redis Cluster slot."""
    base = f"{prefix}:{{reg}}"
    return f"{base}:products", f"{base}:devices:"


def session_keys(device: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """One signed-session device's session (stores/registry.py): the hash of the live session
    and the set of signs that opened a session the device has not used since. The
    ``{ss:<device>}`` hash tag keeps both on one Cluster slot; devices spread over the slots."""
    base = f"{prefix}:{{ss:{device}}}"
    return f"{base}:session", f"{base}:unused"


def templates_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Hash of the payload templates (stores/templates.py): template id → its record (the
    template's JSON text as uploaded, its name, when it was created). Templates never change
    once stored (a changed template is a new id), so one hash under ``{tpl}`` serves every
    replica and any replica may cache a compiled template by id for good."""
    return f"{prefix}:{{tpl}}"


def dtls_session_key(cid_hex: str, prefix: str = DEFAULT_PREFIX) -> str:
    """One DTLS session found by its Connection ID (stores/dtls_sessions.py): a hash of the
    exported state, the identity, the key check, the highest authenticated sequence number and
    the write sequence ceiling. Its own ``{dtls:<cid>}`` hash tag: each step is one script on
    one Redis Cluster slot, and sessions spread over the slots."""
    return f"{prefix}:{{dtls:{cid_hex}}}:session"


def dtls_identity_key(identity: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Set of the CIDs (hex) of one PSK identity's stored DTLS sessions, so that a changed or
    revoked key deletes them all (stores/dtls_sessions.py)."""
    return f"{prefix}:{{dtlsid:{identity}}}:cids"
