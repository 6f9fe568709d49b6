"""Pre-shared keys: how they are written, generated and rotated (docs/CONTRACT.md §6, §7).

A PSK is kept as the string the user set or the generator produced. Plain text is used as its
UTF-8 bytes; ``0x`` followed by an even number of hex digits is the bytes those digits name.
The DTLS handshake uses :func:`psk_bytes`; ``/bootstrap`` and onboarding hand out the string.

Rotation (1NCE): a generated key is regenerated when a bootstrap/onboarding call comes five
minutes or more after the previous one; a key the user set is never regenerated.

Two generated formats (docs/API.md, "Credentials"): ``alnum16``, 16 characters of [A-Za-z0-9]
(bootstrap and the default of the credentials endpoint), and ``hex64``, 32 random bytes written
as 64 lowercase hex characters, the form the managed-PSK platform issues. Its devices give that
text to libcoap's ``-k``, which uses the characters themselves as the key: 64 ASCII bytes on the
wire, so the text is stored as a plain key, never decoded as ``0x`` hex.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta

ALPHABET = string.ascii_letters + string.digits
GENERATED_LENGTH = 16  # ≥ 16 of [A-Za-z0-9]: ~95 bits from the system CSPRNG
HEX_RANDOM_BYTES = 32  # hex64: 256 bits, written as 64 hex characters
ROTATION_AFTER = timedelta(minutes=5)
# DTLS_PSK_MAX_KEY_LEN of our tinydtls build (scripts/patches/dtlssocket-0.2.3-psk-64-bytes.patch;
# the published one has 16): room for a hex64 key; proxy/transports/dtls.py has the same limit.
MAX_PSK_BYTES = 64
KEY_FORMATS = ("alnum16", "hex64")


class PskError(ValueError):
    """A PSK that cannot be used; the message says why."""


def generate_psk(length: int = GENERATED_LENGTH) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def generate_hex_psk(random_bytes: int = HEX_RANDOM_BYTES) -> str:
    """hex64: the key is this text (64 lowercase hex characters = 64 key bytes)."""
    return secrets.token_hex(random_bytes)


def generate_key(key_format: str) -> str:
    """A fresh key in one of :data:`KEY_FORMATS`."""
    if key_format == "alnum16":
        return generate_psk()
    if key_format == "hex64":
        return generate_hex_psk()
    raise PskError(f"key_format must be one of {', '.join(KEY_FORMATS)}")


def psk_bytes(psk: str) -> bytes:
    """The key material for the handshake."""
    if psk[:2] in ("0x", "0X"):
        try:
            return bytes.fromhex(psk[2:])
        except ValueError as exc:
            raise PskError("hex PSK must be 0x followed by pairs of hex digits") from exc
    return psk.encode()


def normalise_psk(value: str, fmt: str = "plain") -> str:
    """A user-supplied key in ``plain`` or ``hex`` format → the stored string, validated."""
    if fmt == "hex":
        digits = value[2:] if value[:2] in ("0x", "0X") else value
        psk = "0x" + digits.lower()
    elif fmt == "plain":
        psk = value
    else:
        raise PskError("format must be 'plain' or 'hex'")
    key = psk_bytes(psk)
    if not key:
        raise PskError("PSK is empty")
    if len(key) > MAX_PSK_BYTES:
        raise PskError(f"PSK is {len(key)} bytes, at most {MAX_PSK_BYTES}")
    return psk


@dataclass(frozen=True, slots=True)
class BootstrapDecision:
    psk: str
    regenerated: bool


def bootstrap_psk(
    current: str | None,
    user_set: bool,
    last_bootstrap_at: datetime | None,
    now: datetime,
) -> BootstrapDecision:
    """The PSK a bootstrap/onboarding call at ``now`` hands out (docs/CONTRACT.md §7). The
    caller stores the result and records ``now`` as the new ``last_bootstrap_at``."""
    if current is None:
        return BootstrapDecision(generate_psk(), True)
    if user_set:
        return BootstrapDecision(current, False)
    if last_bootstrap_at is None or now - last_bootstrap_at >= ROTATION_AFTER:
        return BootstrapDecision(generate_psk(), True)
    return BootstrapDecision(current, False)
