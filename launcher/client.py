"""``coap-bridge devices | psk | commands``: the management API (docs/API.md) from a shell.

Where the client finds the API and its key, first match wins:

- the URL: ``--api-url``, ``COAP_BRIDGE_API_URL``, ``api_url`` in the config file,
  ``http://127.0.0.1:8080`` (where ``coap-bridge up`` serves);
- the key: ``COAP_BRIDGE_API_KEY`` (the variable that pins the key of ``up`` and ``api``, so
  one ``export`` serves both), ``api_key`` in the config file. There is no ``--api-key`` flag
  here: a key on the command line is readable by every user of the machine (``ps``).

The config file is ``--config``, else ``COAP_BRIDGE_CONFIG``, else
``$XDG_CONFIG_HOME/coap-bridge/config.toml`` (``~/.config/...``); TOML with the keys
``api_url``, ``api_key`` and ``timeout``. Exit codes: 0 done, 1 the API refused (its message
is printed) or could not be reached, 2 a usage or configuration error.

Plain urllib: the client is a handful of calls, and the product's dependencies stay as they
are (httpx is a test tool here).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import stat
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

DEFAULT_API_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 10.0
_CONFIG_KEYS = frozenset({"api_url", "api_key", "timeout"})

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command line or configuration the client cannot use (exit 2)."""


class ApiError(Exception):
    """The API answered with an error, or could not be reached (exit 1)."""


@dataclass(frozen=True)
class ClientConfig:
    api_url: str
    api_key: str | None
    timeout: float = DEFAULT_TIMEOUT


def config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "coap-bridge" / "config.toml"


def _read_config(path: Path, explicit: bool, warn: TextIO) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise UsageError(
            f"config file {path}: unknown keys {unknown}; known: {sorted(_CONFIG_KEYS)}"
        )
    for key in ("api_url", "api_key"):
        if key in data and not isinstance(data[key], str):
            raise UsageError(f"config file {path}: {key} must be a string")
    if "timeout" in data and (
        isinstance(data["timeout"], bool)
        or not isinstance(data["timeout"], int | float)
        or data["timeout"] <= 0
    ):
        raise UsageError(f"config file {path}: timeout must be a number of seconds above 0")
    if "api_key" in data and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # As ssh does with a private key: say so, since anyone who can read it owns the API.
        print(
            f"coap-bridge: warning: {path} holds the API key and is readable by other users "
            f"(chmod 600 {path})",
            file=warn,
        )
    return data


def load_config(
    api_url: str | None,
    config: str | None,
    env: Mapping[str, str],
    warn: TextIO | None = None,
) -> ClientConfig:
    """The client's settings from the flag, the environment and the config file (in that
    order of precedence; see the module's docstring)."""
    explicit = config is not None or bool(env.get("COAP_BRIDGE_CONFIG"))
    path = Path(config or env.get("COAP_BRIDGE_CONFIG") or config_path(env)).expanduser()
    data = _read_config(path, explicit, warn or sys.stderr)
    url = api_url or env.get("COAP_BRIDGE_API_URL") or data.get("api_url") or DEFAULT_API_URL
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"api_url {url!r} is not an http:// or https:// URL")
    key = env.get("COAP_BRIDGE_API_KEY") or data.get("api_key")
    return ClientConfig(
        api_url=url.rstrip("/"),
        api_key=key or None,
        timeout=float(data.get("timeout", DEFAULT_TIMEOUT)),
    )


# --- HTTP -------------------------------------------------------------------------------------


def _error_message(status: int, body: bytes) -> str:
    """The API's own words: ``{"detail": "..."}``, or a 422's list of fields (api/errors.py)."""
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return text[:200] or "no message"
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            loc = [str(p) for p in item.get("loc", []) if p not in ("body", "path", "query")]
            where = ".".join(loc)
            parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return "; ".join(parts)
    return str(detail)


class Client:
    """One blocking call per command: nothing here needs an event loop."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config

    def call(self, method: str, path: str, body: object = None) -> Any:
        """The decoded JSON answer (None for an empty one); ApiError for anything else."""
        if self.config.api_key is None:
            raise UsageError(
                "no API key: set COAP_BRIDGE_API_KEY, or api_key in "
                f"{config_path(os.environ)} (the key 'coap-bridge up' logs or was given)"
            )
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.config.api_url + path, data=data, method=method
        )  # fmt: skip
        request.add_header("Authorization", f"Bearer {self.config.api_key}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                answer = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise ApiError(
                    f"{method} {path}: {exc.code} {_error_message(exc.code, exc.read())}"
                ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"cannot reach the API at {self.config.api_url}: {reason}") from None
        if not answer:
            return None
        try:
            return json.loads(answer)
        except ValueError:
            raise ApiError(f"{method} {path}: the answer is not JSON") from None


def _segment(value: str) -> str:
    # One path segment whatever the id holds (RFC 3986 §3.3): a '/' stays data.
    return quote(value, safe="")


# --- output -----------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """Columns padded to their widest cell; an empty listing is the header alone."""
    cells = [[name.upper() for name in columns]]
    cells += [[_cell(row.get(name)) for name in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def record(item: Mapping[str, object]) -> str:
    """One object as ``field  value`` lines."""
    width = max((len(key) for key in item), default=0)
    return "\n".join(f"{key.ljust(width)}  {_cell(value)}" for key, value in item.items())


def _emit(args: argparse.Namespace, out: TextIO, answer: Any, columns: Sequence[str]) -> None:
    if args.output == "json":
        print(json.dumps(answer, indent=2), file=out)
    elif isinstance(answer, list):
        print(table(answer, columns), file=out)
    elif isinstance(answer, dict):
        print(record(answer), file=out)


# --- commands ---------------------------------------------------------------------------------

DEVICE_COLUMNS = ("id", "iccid", "imei", "ip", "status", "template", "last_bootstrap_at")
COMMAND_COLUMNS = ("id", "state", "content_format", "size", "created_at", "expires_at")


def _flag(value: str) -> bool:
    text = value.strip().lower()
    if text in ("yes", "true", "1", "on"):
        return True
    if text in ("no", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not yes or no")


def _devices_list(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    _emit(args, out, client.call("GET", "/devices"), DEVICE_COLUMNS)


def _devices_add(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    if (args.id is None) == (args.iccid is None):
        raise UsageError("devices add: give --iccid and --ip (a SIM), or --id (any other device)")
    body: dict[str, object] = {"status": args.status}
    for name in ("id", "iccid", "imei", "ip"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    _emit(args, out, client.call("POST", "/devices", body), DEVICE_COLUMNS)


def _devices_show(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    _emit(args, out, client.call("GET", f"/devices/{_segment(args.device)}"), DEVICE_COLUMNS)


def _devices_patch(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    changes: dict[str, object] = {}
    for name in ("ip", "status", "imei", "terms_accepted", "location_barred"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.template is not None:
        # "none" detaches the template: the API's null (docs/API.md, payload templates).
        changes["template"] = None if args.template.lower() == "none" else args.template
    if not changes:
        raise UsageError("devices patch: nothing to change (see coap-bridge devices patch -h)")
    path = f"/devices/{_segment(args.device)}"
    _emit(args, out, client.call("PATCH", path, changes), DEVICE_COLUMNS)


def _devices_delete(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    client.call("DELETE", f"/devices/{_segment(args.device)}")
    if args.output != "json":
        print(f"device {args.device} deleted", file=out)


def _read_psk(device: str, stdin: TextIO) -> str:
    """The key from a prompt (a terminal) or stdin's first line: never from argv, which every
    user of the machine can read."""
    if stdin.isatty():
        key = getpass.getpass(f"PSK for {device}: ")
    else:
        key = stdin.readline().rstrip("\r\n")
    if not key:
        raise UsageError("psk set: no key given on stdin (or use --generate)")
    return key


def _psk_set(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    device = _segment(args.device)
    if args.generate:
        body = {"auth_type": "psk", "key_format": args.key_format}
        answer = client.call("POST", f"/devices/{device}/credentials", body)
        _emit(args, out, answer, ())
        if args.output != "json":
            print("(the key is shown only this once: it cannot be read back)", file=out)
        return
    key = _read_psk(args.device, args.stdin)
    client.call("PUT", f"/devices/{device}/psk", {"psk": key, "format": args.format})
    if args.output != "json":
        print(f"PSK of {args.device} set", file=out)


def _psk_revoke(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    client.call("DELETE", f"/devices/{_segment(args.device)}/psk")
    if args.output != "json":
        print(f"PSK of {args.device} revoked", file=out)


def _commands_send(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    body: dict[str, object] = {}
    if args.json is not None:
        try:
            body["payload"] = json.loads(args.json)
        except ValueError as exc:
            raise UsageError(f"commands send: --json is not JSON: {exc}") from exc
    elif args.base64 is not None:
        body["payload_base64"] = args.base64
    else:
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise UsageError(f"commands send: cannot read {args.file}: {exc.strerror}") from exc
        body["payload_base64"] = base64.b64encode(data).decode()
    if args.content_format is not None:
        body["content_format"] = args.content_format
    if args.ttl is not None:
        body["ttl"] = args.ttl
    path = f"/devices/{_segment(args.device)}/commands"
    _emit(args, out, client.call("POST", path, body), COMMAND_COLUMNS)


def _commands_list(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    answer = client.call("GET", f"/devices/{_segment(args.device)}/commands")
    if args.output == "json":
        _emit(args, out, answer, COMMAND_COLUMNS)
        return
    print(table(answer["commands"], COMMAND_COLUMNS), file=out)
    observers = answer.get("observers")
    print(f"observers: {'unknown' if observers is None else observers}", file=out)


Runner = Callable[[Client, argparse.Namespace, TextIO], None]

CLIENT_COMMANDS = ("devices", "psk", "commands")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        default=None,
        help=f"the API's base URL (env COAP_BRIDGE_API_URL, config api_url; default "
        f"{DEFAULT_API_URL}); the key: env COAP_BRIDGE_API_KEY or config api_key",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="config file (env COAP_BRIDGE_CONFIG; default ~/.config/coap-bridge/config.toml)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json: the API's answer as is",
    )


def _leaf(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    runner: Runner,
    device: bool = True,
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=text, description=text)
    if device:
        parser.add_argument("device", metavar="DEVICE", help="the device's id (a SIM's ICCID)")
    _common(parser)
    parser.set_defaults(client_runner=runner)
    return parser


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The client's subcommands under ``coap-bridge`` (launcher/cli.py)."""
    devices = commands.add_parser(
        "devices", help="list, add, show, patch, delete devices (the API)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    _leaf(devices, "list", "list every device", _devices_list, device=False)
    add = _leaf(devices, "add", "register a device", _devices_add, device=False)
    add.add_argument("--iccid", help="a SIM's ICCID (its id); needs --ip")
    add.add_argument("--ip", help="a SIM's source address over plain CoAP")
    add.add_argument("--id", help="any other device's id (its DTLS PSK identity)")
    add.add_argument("--imei", help="the device's IMEI, if it has one")
    add.add_argument("--status", choices=("active", "inactive"), default="active")
    _leaf(devices, "show", "one device", _devices_show)
    patch = _leaf(devices, "patch", "change fields of a device", _devices_patch)
    patch.add_argument("--ip")
    patch.add_argument("--imei")
    patch.add_argument("--status", choices=("active", "inactive"))
    patch.add_argument("--terms-accepted", type=_flag, metavar="yes|no")
    patch.add_argument("--location-barred", type=_flag, metavar="yes|no")
    patch.add_argument("--template", metavar="ID|none", help="payload template; none: detach")
    _leaf(devices, "delete", "delete a device", _devices_delete)

    psk = commands.add_parser("psk", help="set or revoke a device's PSK (the API)")
    psk_actions = psk.add_subparsers(dest="action", required=True, metavar="ACTION")
    set_ = _leaf(
        psk_actions,
        "set",
        "set a device's PSK, read from stdin or a prompt (never an argument: ps shows those); "
        "or --generate one, shown once",
        _psk_set,
    )
    set_.add_argument("--format", choices=("plain", "hex"), default="plain")
    set_.add_argument("--generate", action="store_true", help="let the API make a random key")
    set_.add_argument("--key-format", choices=("alnum16", "hex64"), default="alnum16")
    set_.set_defaults(stdin=sys.stdin)
    _leaf(psk_actions, "revoke", "revoke a device's PSK", _psk_revoke)

    cmds = commands.add_parser("commands", help="queue commands for a device (the API)")
    cmd_actions = cmds.add_subparsers(dest="action", required=True, metavar="ACTION")
    send = _leaf(cmd_actions, "send", "queue a command for a device", _commands_send)
    payload = send.add_mutually_exclusive_group(required=True)
    payload.add_argument("--json", metavar="TEXT", help="a JSON payload")
    payload.add_argument("--base64", metavar="TEXT", help="payload bytes in base64")
    payload.add_argument("--file", metavar="PATH", help="payload bytes from a file")
    send.add_argument("--content-format", type=int, metavar="N", help="CoAP Content-Format")
    send.add_argument("--ttl", type=int, metavar="SECONDS", help="how long it waits")
    _leaf(cmd_actions, "list", "a device's commands and their states", _commands_list)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """One client subcommand; the exit code (see the module's docstring)."""
    # Looked up per call, not bound as defaults at import: a caller may swap the streams.
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        config = load_config(args.api_url, args.config, os.environ, warn=err)
        args.client_runner(Client(config), args, out)
    except UsageError as exc:
        print(f"coap-bridge: {exc}", file=err)
        return EXIT_USAGE
    except ApiError as exc:
        print(f"coap-bridge: {exc}", file=err)
        return EXIT_API
    return EXIT_OK
