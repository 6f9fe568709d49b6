"""The console's HTML, rendered on the server. Every value from a request or the store goes
through :func:`e` (HTML-escaped, quotes included): device ids, IMEIs, messages are user input.
No inline script or style: the Content-Security-Policy of every page allows this origin's
files only (api/console/static)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape

from api.store.base import Device
from stores.presence import Presence

TITLE = "coap-bridge console"


def e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def page(title: str, body: str, *, signed_in: bool = True, script: bool = False) -> str:
    nav = ""
    if signed_in:
        nav = (
            '<nav><a href="/console">Devices</a> <a href="/console/live">Live messages</a> '
            '<a href="/docs">API docs</a> '
            '<form method="post" action="/console/logout" class="inline">'
            '<button type="submit">Sign out</button></form></nav>'
        )
    js = '<script src="/console/static/console.js" defer></script>' if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · {TITLE}</title>"
        f'<link rel="stylesheet" href="/console/static/console.css">{js}</head>'
        f"<body><header><h1>{TITLE}</h1>{nav}</header><main>{body}</main></body></html>"
    )


def notice(message: str | None, *, error: bool = False) -> str:
    if not message:
        return ""
    kind = "error" if error else "ok"
    role = "alert" if error else "status"
    return f'<p class="notice {kind}" role="{role}" id="notice">{e(message)}</p>'


def login(message: str | None = None, *, configured: bool = True) -> str:
    if not configured:
        body = notice(
            "The console is off: no management API key is configured. Start the API with "
            "--api-key or COAP_BRIDGE_API_KEY ('coap-bridge up' generates one and logs it).",
            error=True,
        )
        return page("Sign in", body, signed_in=False)
    body = (
        "<h2>Sign in</h2>"
        + notice(message, error=True)
        + '<form method="post" action="/console/login" class="card">'
        '<label>Management API key <input type="password" name="key" id="key" required '
        'autocomplete="current-password"></label>'
        '<button type="submit" id="sign-in">Sign in</button></form>'
        "<p>The key is the one management calls send as <code>Authorization: Bearer</code>. "
        "The console keeps a session cookie derived from it, never the key.</p>"
    )
    return page("Sign in", body, signed_in=False)


def _online(presence: Presence | None) -> str:
    if presence is None or (presence.last_seen is None and not presence.online):
        return '<span class="badge off">no presence</span>'
    if presence.online:
        return '<span class="badge on">online</span>'
    return '<span class="badge off">offline</span>'


def devices(
    found: Sequence[tuple[Device, Presence | None]],
    *,
    query: str,
    total: int,
    more: int,
    message: str | None = None,
    error: bool = False,
) -> str:
    rows = "".join(
        "<tr>"
        f'<td><a href="/console/devices/{e(device.id)}">{e(device.id)}</a></td>'
        f"<td>{e(device.imei or '')}</td><td>{e(device.ip or '')}</td>"
        f"<td>{e(device.status)}</td><td>{_online(presence)}</td>"
        f"<td>{when(presence.last_seen if presence else None)}</td>"
        f"<td>{'set' if device.psk else 'none'}</td>"
        "</tr>"
        for device, presence in found
    )
    shown = f"{len(found)} of {total} devices" + (f" ({more} more match)" if more else "")
    body = (
        notice(message, error=error)
        + "<h2>Devices</h2>"
        + '<form method="get" action="/console" class="search">'
        f'<input type="search" name="q" value="{e(query)}" placeholder="id, ICCID, IMEI or ip">'
        '<button type="submit">Search</button></form>'
        + f"<p>{e(shown)}</p>"
        + '<table id="devices"><thead><tr><th>id</th><th>IMEI</th><th>ip</th><th>status</th>'
        "<th>presence</th><th>last seen</th><th>PSK</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>" + "<h2>Register a device</h2>"
        '<form method="post" action="/console/devices" class="card" id="register">'
        "<p>A SIM: ICCID and ip. Any other device: an id (its DTLS PSK identity) and maybe "
        "an IMEI.</p>"
        '<label>ICCID <input name="iccid" id="reg-iccid" inputmode="numeric"></label>'
        '<label>ip <input name="ip" id="reg-ip"></label>'
        '<label>or id <input name="id" id="reg-id"></label>'
        '<label>IMEI <input name="imei" id="reg-imei" inputmode="numeric"></label>'
        '<label>status <select name="status"><option>active</option><option>inactive'
        "</option></select></label>"
        '<button type="submit" id="reg-submit">Register</button></form>'
    )
    return page("Devices", body)


def device(
    found: Device,
    presence: Presence | None,
    *,
    location_managed: bool,
    message: str | None = None,
    error: bool = False,
    issued_key: str | None = None,
) -> str:
    base = f"/console/devices/{e(found.id)}"
    location = found.location
    facts: Iterable[tuple[str, str]] = (
        ("id", e(found.id)),
        ("ICCID", e(found.iccid or "")),
        ("IMEI", e(found.imei or "")),
        ("ip", e(found.ip or "")),
        ("status", e(found.status)),
        ("presence", _online(presence)),
        ("last seen", when(presence.last_seen if presence else None)),
        (
            "PSK",
            "set" + (" (by an operator)" if found.psk_user_set else "") if found.psk else "none",
        ),
        ("payload template", e(found.template or "none")),
        (
            "location",
            "unknown"
            if location is None
            else f"{e(location.latitude)}, {e(location.longitude)} ({e(location.source)}, "
            f"{when(location.sample_time)})",
        ),
    )
    table = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    shown_once = ""
    if issued_key is not None:
        shown_once = (
            '<section class="card once" id="issued"><h3>New PSK: shown once</h3>'
            f'<p>Identity <code>{e(found.id)}</code>, key <code id="issued-key">'
            f"{e(issued_key)}</code></p><p>Copy it now: it cannot be read back, only "
            "replaced.</p></section>"
        )
    location_form = ""
    if location_managed:
        location_form = (
            f'<form method="post" action="{base}/location" class="card" id="location">'
            "<h3>Set location</h3>"
            '<label>latitude <input name="latitude" required></label>'
            '<label>longitude <input name="longitude" required></label>'
            '<label>source <input name="source" value="Console" required></label>'
            '<label>sample time (unix s, empty: now) <input name="sample_time"></label>'
            '<button type="submit">Save location</button></form>'
        )
    body = (
        notice(message, error=error)
        + shown_once
        + f"<h2>Device {e(found.id)}</h2>"
        + f'<table class="facts" id="facts">{table}</table>'
        + '<div class="forms">'
        f'<form method="post" action="{base}/psk" class="card" id="set-psk">'
        "<h3>Set PSK</h3>"
        '<label>key <input type="password" name="psk" id="psk" required '
        'autocomplete="off"></label>'
        '<label>format <select name="format"><option>plain</option><option>hex</option>'
        "</select></label>"
        '<button type="submit">Set PSK</button></form>'
        f'<form method="post" action="{base}/credentials" class="card" id="generate-psk">'
        "<h3>Generate PSK</h3><p>Replaces any key; shown once.</p>"
        '<label>format <select name="key_format"><option value="alnum16">16 letters and '
        'digits</option><option value="hex64">64 hex characters</option></select></label>'
        '<button type="submit" id="generate">Generate</button></form>'
        f'<form method="post" action="{base}/psk/revoke" class="card" id="revoke-psk">'
        "<h3>Revoke PSK</h3><p>DTLS handshakes with this identity fail from now on.</p>"
        '<button type="submit">Revoke</button></form>'
        + location_form
        + f'<form method="post" action="{base}/send" class="card" id="send">'
        "<h3>Send as this device</h3><p>Published through the ingest path, to the topic "
        "the device's messages go to, as if the device had sent it. See it under <a href=\""
        '/console/live">Live messages</a>.</p>'
        '<label>payload <textarea name="payload" id="payload" rows="3"></textarea></label>'
        '<label>as <select name="encoding"><option value="text">text (UTF-8)</option>'
        '<option value="hex">hex bytes</option></select></label>'
        '<label>content type <select name="content_type"><option>application/json</option>'
        "<option>text/plain</option><option>application/octet-stream</option>"
        "<option>application/cbor</option></select></label>"
        '<button type="submit" id="send-submit">Send</button></form>'
        "</div>"
    )
    return page(f"Device {found.id}", body)


def live() -> str:
    body = (
        "<h2>Live messages</h2>"
        '<p>Messages as the MQTT broker delivers them on <code id="live-filter">…</code>, '
        'from every replica. <span id="live-state">connecting…</span> '
        '<span id="live-dropped" class="dropped">0 dropped</span></p>'
        '<table id="live"><thead><tr><th>time</th><th>device</th><th>topic</th>'
        "<th>size</th><th>payload</th></tr></thead><tbody></tbody></table>"
    )
    return page("Live messages", body, script=True)


def problem(title: str, message: str) -> str:
    return page(title, notice(message, error=True))
