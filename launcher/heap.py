"""Keep the garbage collector's full passes off the request path.

A started process holds many objects that live as long as it does (modules, classes, functions
of FastAPI, pydantic, redis-py …), and CPython's full collection walks all of them while every
request waits. Moving them to the permanent generation once startup is over (``gc.freeze()``)
leaves the later passes only the objects created since. The measured pause and its effect on
p99: docs/ARCHITECTURE.md, "Startup objects are frozen out of the garbage collector".
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect what startup left behind, then exempt every survivor from later collections.

    Call once the process has finished starting (imports done, app built, sockets bound).
    Returns the number of objects frozen. Objects created later are collected as usual; a
    frozen object that becomes garbage is freed by reference counting, or not at all if it
    sits in a cycle (startup objects live for the whole process anyway)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("heap: %d startup objects exempted from garbage collection", frozen)
    return frozen
