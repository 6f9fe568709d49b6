"""Profiles: what a kind of device needs of coap-bridge (docs/PROFILES.md).

A profile is a route table (``<name>.toml`` beside this module, loaded and merged by
:func:`policies.routes.load_profiles`), the API resources it enables (api/profiles.py) and the
identity rules those resources apply. In code a profile is named for what it does; the
``--profile`` flag also takes the names the platforms' users know, and :data:`FLAG_VALUES` is
the one place those names appear.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

SIM_IDENTITY = "sim_identity"
MANAGED_PSK = "managed_psk"
SIGNED_SESSION = "signed_session"

PROFILES = (SIM_IDENTITY, MANAGED_PSK, SIGNED_SESSION)
"""Every profile by its code name, in the order their routes and resources are merged."""

DEFAULT_PROFILES = (SIM_IDENTITY,)
"""Today's product: what runs when no profile is named."""

# Flag value → code name. A code name is a flag value too (see profile_names).
FLAG_VALUES = {
    "1nce": SIM_IDENTITY,
    "sim": SIM_IDENTITY,
    "nhub": MANAGED_PSK,
    "managed-psk": MANAGED_PSK,
    "enos": SIGNED_SESSION,
    "signed-session": SIGNED_SESSION,
}


class UnknownProfile(ValueError):
    """A profile name that is neither a code name nor a flag value; the message lists both."""


def known_names() -> str:
    """The accepted names, for error messages: ``sim_identity (1nce, sim), ...``."""
    parts = []
    for profile in PROFILES:
        aliases = [value for value, name in FLAG_VALUES.items() if name == profile]
        parts.append(f"{profile} ({', '.join(aliases)})")
    return ", ".join(parts)


def profile_name(value: str) -> str:
    """The code name of one flag value or code name (any case, surrounding blanks ignored)."""
    text = value.strip().lower()
    name = FLAG_VALUES.get(text, text.replace("-", "_"))
    if name not in PROFILES:
        raise UnknownProfile(f"unknown profile {value.strip()!r}; known: {known_names()}")
    return name


def profile_names(raw: object) -> list[str]:
    """The code names a setting names, each once, in the order given.

    ``raw``: a comma list (``"1nce,nhub"``, what ``COAP_BRIDGE_PROFILES`` holds), a JSON list
    (``'["sim_identity"]'``), or a list of either (``--profile`` repeated, each value possibly
    a comma list). An empty result is refused: some profile must serve the devices.
    """
    if isinstance(raw, str):
        text = raw.strip()
        items: Iterable[object] = [text]
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError as exc:
                raise UnknownProfile(f"profiles: {text!r} is not a JSON list of names") from exc
            if not isinstance(items, list):
                raise UnknownProfile(f"profiles: {text!r} is not a JSON list of names")
    elif isinstance(raw, list | tuple):
        items = raw
    else:
        raise UnknownProfile(f"profiles must be a comma list of names, not {raw!r}")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UnknownProfile(f"profiles must be names, not {item!r}")
        for part in item.split(","):
            if not part.strip():
                continue
            name = profile_name(part)
            if name not in names:
                names.append(name)
    if not names:
        raise UnknownProfile(f"no profile named; known: {known_names()}")
    return names
