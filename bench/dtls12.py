"""DTLS 1.2 PSK primitives with Connection ID, written from the RFCs: the PRF and key schedule
(RFC 5246 §5, §6.3, §8.1; RFC 7627 §4), the PSK key exchange (RFC 4279 §2), AES-CCM-8 record
protection (RFC 6655 §3) in the DTLS record layer (RFC 6347 §4.1) and in the tls12_cid record
with its additional data (RFC 9146 §4, §5.3), handshake messages (RFC 6347 §4.2.2) and the
hello extensions of the client side.

One suite only, TLS_PSK_WITH_AES_128_CCM_8 (the one the proxy offers: docs/CONTRACT.md §6),
unfragmented handshake messages only. Two clients drive these with their own logic: the
bench's load generator (bench/cid_loadgen.py, many sessions in one loop) and the tests' client
(tests/support/dtls_cid_client.py: retransmission, forging). Nothing here touches a socket.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

# Content types (RFC 5246 §6.2.1; tls12_cid: RFC 9146 §4).
CT_CHANGE_CIPHER_SPEC, CT_ALERT, CT_HANDSHAKE, CT_APPLICATION_DATA = 20, 21, 22, 23
CT_TLS12_CID = 25
# Handshake types (RFC 5246 §7.4, RFC 6347 §4.3.2).
HT_CLIENT_HELLO, HT_SERVER_HELLO, HT_HELLO_VERIFY_REQUEST = 1, 2, 3
HT_SERVER_KEY_EXCHANGE, HT_SERVER_HELLO_DONE, HT_CLIENT_KEY_EXCHANGE, HT_FINISHED = 12, 14, 16, 20
# Extensions: extended_master_secret (RFC 7627 §5.1), renegotiation_info (RFC 5746 §3.2),
# connection_id (RFC 9146 §3, IANA value 54).
EXT_EMS, EXT_RENEGOTIATION_INFO, EXT_CONNECTION_ID = 23, 0xFF01, 54
TLS_PSK_WITH_AES_128_CCM_8 = 0xC0A8
DTLS_1_2 = b"\xfe\xfd"
RECORD_HEADER = 13  # type, version, epoch, sequence_number (48 bit), length (RFC 6347 §4.1)
HANDSHAKE_HEADER = 12  # type, length, message_seq, fragment_offset, fragment_length (§4.2.2)
EXPLICIT_NONCE, TAG = 8, 8  # RFC 6655 §3: CCMNonce.nonce_explicit, CCM_8's 8-byte ICV

HandshakeMessage = tuple[int, bytes, bytes]
"""(msg_type, body, the whole message as the transcript hashes it)."""


class RecordAuthError(Exception):
    """A protected record failed authentication (wrong keys, or forged)."""


class ServerHelloRefused(Exception):
    """The server chose what this client did not offer: another version or cipher suite."""


class RecordKeys(NamedTuple):
    """One direction's record protection: the AES-CCM-8 key and the 4-byte write IV, which is
    the salt of every nonce (RFC 6655 §3). A tuple: a test may install its own keys."""

    cipher: AESCCM
    iv: bytes


def prf(secret: bytes, label: bytes, seed: bytes, size: int) -> bytes:
    """TLS 1.2 PRF with SHA-256 (RFC 5246 §5): P_SHA256(secret, label + seed)."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < size:
        a = hmac.digest(secret, a, "sha256")
        out += hmac.digest(secret, a + seed, "sha256")
    return out[:size]


def verify_data(master: bytes, sender: bytes, transcript: list[bytes]) -> bytes:
    """Finished.verify_data (RFC 5246 §7.4.9): 12 bytes of PRF over the transcript's hash;
    ``sender`` is b"client" or b"server"."""
    digest = hashlib.sha256(b"".join(transcript)).digest()
    return prf(master, sender + b" finished", digest, 12)


def vector(data: bytes, size_bytes: int) -> bytes:
    """A variable-length vector: its length in ``size_bytes`` bytes, then the data."""
    return len(data).to_bytes(size_bytes, "big") + data


def extension(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def connection_id_extension(cid: bytes) -> bytes:
    """RFC 9146 §3: ``cid<0..2^8-1>``; a zero-length CID asks the server to send none."""
    return extension(EXT_CONNECTION_ID, vector(cid, 1))


def handshake_message(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """One unfragmented DTLS handshake message (RFC 6347 §4.2.2): the form the transcript
    hashes (§4.2.6) and, here, the form sent."""
    length = len(body).to_bytes(3, "big")
    return bytes([msg_type]) + length + struct.pack("!H", message_seq) + b"\0\0\0" + length + body


def read_handshake(payload: bytes) -> HandshakeMessage | None:
    """The handshake message at the start of a record's plaintext; None when it is shorter
    than its header says or a fragment (neither client reassembles: the proxy's flights fit
    a datagram)."""
    if len(payload) < HANDSHAKE_HEADER:
        return None
    length = int.from_bytes(payload[1:4], "big")
    offset, fragment = int.from_bytes(payload[6:9], "big"), int.from_bytes(payload[9:12], "big")
    if offset != 0 or fragment != length or len(payload) < HANDSHAKE_HEADER + length:
        return None
    end = HANDSHAKE_HEADER + length
    return payload[0], payload[HANDSHAKE_HEADER:end], payload[:end]


def seq_of(message: bytes) -> int:
    """The message_seq of a whole handshake message (RFC 6347 §4.2.2)."""
    return int.from_bytes(message[4:6], "big")


def client_hello(client_random: bytes, cookie: bytes, message_seq: int, extensions: bytes) -> bytes:
    """ClientHello (RFC 6347 §4.2.1, RFC 5246 §7.4.1.2): no session to resume, our one suite,
    null compression, ``extensions`` (each from :func:`extension`) if any."""
    body = DTLS_1_2 + client_random + b"\x00" + vector(cookie, 1)
    body += vector(struct.pack("!H", TLS_PSK_WITH_AES_128_CCM_8), 2) + b"\x01\x00"
    if extensions:
        body += vector(extensions, 2)
    return handshake_message(HT_CLIENT_HELLO, message_seq, body)


def hello_verify_cookie(body: bytes) -> bytes:
    """HelloVerifyRequest (RFC 6347 §4.2.1): server_version, cookie<0..2^8-1>."""
    return body[3 : 3 + body[2]]


@dataclass(frozen=True)
class ServerHello:
    """ServerHello (RFC 5246 §7.4.1.3): DTLS 1.2 and our suite; the client decides which of
    the extensions to accept."""

    random: bytes
    extensions: list[tuple[int, bytes]]


def server_hello(body: bytes) -> ServerHello:
    """ServerHelloRefused for another version or cipher suite than the ClientHello's."""
    if body[:2] != DTLS_1_2:
        raise ServerHelloRefused(f"server chose version {body[:2].hex()}, not DTLS 1.2")
    at = 35 + body[34]  # version, random, session_id<0..32>
    suite = int.from_bytes(body[at : at + 2], "big")
    if suite != TLS_PSK_WITH_AES_128_CCM_8:
        raise ServerHelloRefused(f"server chose cipher suite {suite:#06x}")
    at += 3  # suite, compression method
    raw = body[at + 2 : at + 2 + int.from_bytes(body[at : at + 2], "big")]
    extensions = []
    while len(raw) >= 4:
        ext_type, size = struct.unpack("!HH", raw[:4])
        extensions.append((ext_type, raw[4 : 4 + size]))
        raw = raw[4 + size :]
    return ServerHello(body[2:34], extensions)


@dataclass(frozen=True)
class FinalFlight:
    """The client's last flight (RFC 6347 §4.2.4, flight 5) and what the server's answer
    must carry."""

    key_exchange: bytes  # ClientKeyExchange
    finished: bytes  # the client's Finished
    expected: bytes  # the verify_data the server's Finished must carry
    write: RecordKeys  # client_write
    read: RecordKeys  # server_write

    @property
    def records(self) -> list[tuple[int, bytes]]:
        """(content type, data) in sending order; what follows ChangeCipherSpec is sent in
        epoch 1 (RFC 5246 §7.1)."""
        return [
            (CT_HANDSHAKE, self.key_exchange),
            (CT_CHANGE_CIPHER_SPEC, b"\x01"),
            (CT_HANDSHAKE, self.finished),
        ]


def final_flight(
    identity: bytes,
    psk: bytes,
    transcript: list[bytes],
    client_random: bytes,
    server_random: bytes,
    first_seq: int,
    *,
    extended_master_secret: bool,
) -> FinalFlight:
    """From the server's hello flight to our last one: ClientKeyExchange (RFC 4279 §2) with
    message_seq ``first_seq``, the master secret (RFC 5246 §8.1, or RFC 7627 §4 with
    ``extended_master_secret``), the key block (RFC 5246 §6.3), both Finished messages.
    ``transcript``: ClientHello (the one with the cookie) to ServerHelloDone."""
    key_exchange = handshake_message(HT_CLIENT_KEY_EXCHANGE, first_seq, vector(identity, 2))
    transcript = [*transcript, key_exchange]
    # RFC 4279 §2: premaster = uint16 N, N zero bytes, uint16 N, the PSK.
    n = len(psk).to_bytes(2, "big")
    premaster = n + bytes(len(psk)) + n + psk
    if extended_master_secret:  # RFC 7627 §4: hash of ClientHello..ClientKeyExchange
        session_hash = hashlib.sha256(b"".join(transcript)).digest()
        master = prf(premaster, b"extended master secret", session_hash, 48)
    else:
        master = prf(premaster, b"master secret", client_random + server_random, 48)
    # RFC 5246 §6.3: AEAD suites have no MAC keys; RFC 6655: 16-byte keys, 4-byte IVs.
    block = prf(master, b"key expansion", server_random + client_random, 40)
    write = RecordKeys(AESCCM(block[0:16], tag_length=TAG), block[32:36])
    read = RecordKeys(AESCCM(block[16:32], tag_length=TAG), block[36:40])
    finished = handshake_message(
        HT_FINISHED, first_seq + 1, verify_data(master, b"client", transcript)
    )
    expected = verify_data(master, b"server", [*transcript, finished])
    return FinalFlight(key_exchange, finished, expected, write, read)


def _additional_data(content_type: int, epoch_seq: bytes, cid: bytes, size: int) -> bytes:
    if content_type == CT_TLS12_CID:  # RFC 9146 §5.3
        aad = b"\xff" * 8 + bytes([CT_TLS12_CID, len(cid), CT_TLS12_CID]) + DTLS_1_2
        return aad + epoch_seq + cid + struct.pack("!H", size)
    # RFC 5246 §6.2.3.3 with RFC 6347 §4.1.2.1's 64-bit epoch + sequence number.
    return epoch_seq + bytes([content_type]) + DTLS_1_2 + struct.pack("!H", size)


def seal(
    content_type: int,
    data: bytes,
    epoch: int,
    seq: int,
    keys: RecordKeys | None = None,
    cid: bytes = b"",
) -> bytes:
    """One record: plaintext without ``keys`` (epoch 0), else protected with them; with a
    ``cid`` (the one the server asked for) a tls12_cid record (RFC 9146 §4)."""
    epoch_seq = struct.pack("!H", epoch) + seq.to_bytes(6, "big")
    if keys is None:
        return bytes([content_type]) + DTLS_1_2 + epoch_seq + vector(data, 2)
    cipher, iv = keys
    nonce = iv + epoch_seq  # RFC 6655 §3: salt = write IV, nonce_explicit = epoch + seq
    if cid:  # DTLSInnerPlaintext: content, real type (no padding)
        inner = data + bytes([content_type])
        aad = _additional_data(CT_TLS12_CID, epoch_seq, cid, len(inner))
        sealed = epoch_seq + cipher.encrypt(nonce, inner, aad)
        return bytes([CT_TLS12_CID]) + DTLS_1_2 + epoch_seq + cid + vector(sealed, 2)
    aad = _additional_data(content_type, epoch_seq, b"", len(data))
    sealed = epoch_seq + cipher.encrypt(nonce, data, aad)
    return bytes([content_type]) + DTLS_1_2 + epoch_seq + vector(sealed, 2)


def open_record(record: bytes, keys: RecordKeys, cid: bytes = b"") -> tuple[int, bytes] | None:
    """(content type, plaintext) of one whole protected record whose header carries ``cid``
    (a tls12_cid record; b"": none); for a tls12_cid record the inner type (RFC 9146 §4).
    None when it is too short or has no inner type; RecordAuthError when authentication
    fails. Which records a client accepts (epoch, CID) is the client's to decide."""
    content_type, epoch_seq = record[0], record[3:11]
    body = record[RECORD_HEADER + len(cid) :]
    if len(body) < EXPLICIT_NONCE + TAG:
        return None
    cipher, iv = keys
    nonce = iv + body[:EXPLICIT_NONCE]
    aad = _additional_data(content_type, epoch_seq, cid, len(body) - EXPLICIT_NONCE - TAG)
    try:
        plain = cipher.decrypt(nonce, body[EXPLICIT_NONCE:], aad)
    except InvalidTag:
        raise RecordAuthError(
            f"record epoch {int.from_bytes(epoch_seq[:2], 'big')} seq "
            f"{int.from_bytes(epoch_seq[2:], 'big')} failed authentication"
        ) from None
    if content_type == CT_TLS12_CID:  # DTLSInnerPlaintext: content, real_type, zeros
        plain = plain.rstrip(b"\x00")
        return (plain[-1], plain[:-1]) if plain else None
    return content_type, plain
