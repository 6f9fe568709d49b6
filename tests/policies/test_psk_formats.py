"""policies.psk: the generated key formats and the 64-byte limit (issue 16; docs/API.md)."""

from __future__ import annotations

import pytest

from policies.psk import MAX_PSK_BYTES, PskError, generate_key, normalise_psk, psk_bytes


def test_hex64_is_64_lowercase_hex_characters_used_as_text() -> None:
    keys = {generate_key("hex64") for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(key) == 64
        assert set(key) <= set("0123456789abcdef")
        # A plain key: the handshake uses the characters, as libcoap's -k does.
        assert normalise_psk(key) == key
        assert psk_bytes(key) == key.encode()


def test_alnum16_is_the_existing_format() -> None:
    key = generate_key("alnum16")
    assert len(key) == 16
    assert key.isalnum()


def test_an_unknown_format_is_refused_with_the_known_ones() -> None:
    with pytest.raises(PskError, match="alnum16, hex64"):
        generate_key("hex32")


@pytest.mark.parametrize(
    ("value", "fmt", "size"),
    [("k" * 64, "plain", 64), ("ab" * 64, "hex", 64), ("é" * 32, "plain", 64)],
)
def test_64_bytes_is_the_limit(value: str, fmt: str, size: int) -> None:
    assert MAX_PSK_BYTES == 64
    assert len(psk_bytes(normalise_psk(value, fmt))) == size


@pytest.mark.parametrize(("value", "fmt"), [("k" * 65, "plain"), ("ab" * 65, "hex")])
def test_65_bytes_is_refused(value: str, fmt: str) -> None:
    with pytest.raises(PskError, match="PSK is 65 bytes, at most 64"):
        normalise_psk(value, fmt)
