"""JSON request bodies parsed at a bounded cost (issue 12).

``json.loads`` turns every number literal into a Python number of whatever size it spells:
``1e999999999`` read as a :class:`~decimal.Decimal` is cheap, but anything that later makes an
``int`` of it (FastAPI's encoder did, rendering the 422) builds a billion-digit integer and
holds the event loop for good; a 5000-digit integer trips the interpreter's own 4300-digit
guard with a ``ValueError`` that surfaced as 400/500; ``1e999`` becomes ``inf``, which no JSON
answer can carry (500). The hooks below refuse such literals while parsing, so nothing after
the parser ever sees them:

- a number literal longer than :data:`MAX_NUMBER_CHARS` characters;
- a number whose decimal exponent lies outside a double's (±308), or a float that is
  infinite once converted;
- ``NaN``, ``Infinity``, ``-Infinity``: not JSON (RFC 8259 §6), although Python reads them;
- nesting deeper than the interpreter's recursion limit (the parser's ``RecursionError``).

Each refusal is a :class:`json.JSONDecodeError`, which FastAPI answers like any malformed body:
422 ``json_invalid``, the reason in ``ctx.error``. Strings and arrays need no rule of their
own: their cost is linear in the body, and :mod:`api.guard` caps the body first.

Every route with a JSON body uses :class:`SafeJsonRoute` (or :class:`DecimalJsonRoute`);
``tests/api/test_hostile_bodies.py`` checks that no such route is left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from fastapi import Request, Response
from fastapi.routing import APIRoute

MAX_NUMBER_CHARS = 64
"""Longest number literal accepted: any real coordinate, time or count fits many times over."""
MAX_EXPONENT = 308
"""Largest decimal exponent (either sign) of a number: a double's range, 1.8e308."""


class _Refused(ValueError):
    """Raised inside a parse hook; turned into a JSONDecodeError by :func:`loads`."""


def _check_literal(text: str) -> Decimal:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"number literal longer than {MAX_NUMBER_CHARS} characters")
    try:
        value = Decimal(text)  # exact and cheap for a short literal, whatever its exponent
    except InvalidOperation as exc:  # the JSON grammar already rules this out
        raise _Refused("not a number") from exc
    # Zero too: 0e999999999 is a zero with a billion-digit exponent, costly to print as text.
    if not -MAX_EXPONENT <= value.adjusted() <= MAX_EXPONENT:
        raise _Refused(f"number out of range (exponent beyond ±{MAX_EXPONENT})")
    return value


def _parse_int(text: str) -> int:
    _check_literal(text)
    return int(text)


def _parse_float(text: str) -> float:
    _check_literal(text)
    value = float(text)
    if math.isinf(value):  # 1.8e308 has an exponent of 308 and is still too large
        raise _Refused("number out of range (beyond a double's 1.8e308)")
    return value


def _parse_decimal(text: str) -> Decimal:
    return _check_literal(text)


def _parse_constant(text: str) -> Any:
    raise _Refused(f"{text} is not a JSON number (RFC 8259 §6)")


def loads(body: bytes | str, *, decimals: bool = False) -> Any:
    """``json.loads`` with the refusals above; fractions as :class:`Decimal` with
    ``decimals``. Raises :class:`json.JSONDecodeError` for anything it will not return."""
    try:
        return json.loads(
            body,
            parse_int=_parse_int,
            parse_float=_parse_decimal if decimals else _parse_float,
            parse_constant=_parse_constant,
        )
    except _Refused as exc:
        raise json.JSONDecodeError(str(exc), "", 0) from None
    except RecursionError:
        raise json.JSONDecodeError("JSON nested too deeply", "", 0) from None
    except UnicodeDecodeError:
        raise json.JSONDecodeError("body is not UTF-8 (RFC 8259 §8.1)", "", 0) from None


class _SafeJsonRequest(Request):
    decimals: ClassVar[bool] = False

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body(), decimals=self.decimals)
        return self._json


class _DecimalJsonRequest(_SafeJsonRequest):
    decimals = True


class SafeJsonRoute(APIRoute):
    """A route whose JSON body is parsed by :func:`loads` (FastAPI's custom-request pattern)."""

    request_class: ClassVar[type[Request]] = _SafeJsonRequest

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        request_class = self.request_class

        async def safe_handler(request: Request) -> Response:
            return await handler(request_class(request.scope, request.receive))

        return safe_handler


class DecimalJsonRoute(SafeJsonRoute):
    """:class:`SafeJsonRoute` with fractions parsed as :class:`Decimal`, so ``13.404954`` stays
    exactly that (the location routes keep degrees as the text they arrived in)."""

    request_class = _DecimalJsonRequest
