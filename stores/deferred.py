"""Records that wait to ride with the next call instead of making one of their own.

Both sides write a record once a message is answered (the proxy its dedup answer, the API its
Idempotency-Key status) and claim new records for every batch. Written on their own, the
answers were a third of the proxy's Redis calls and half of the API's; queued here, whoever
makes the next call takes them along (:meth:`Deferred.take`), and if no call comes within
``delay`` they are handed to ``due``, which writes them alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Deferred(Generic[Item]):
    def __init__(self, delay: float, due: Callable[[list[Item]], None]) -> None:
        self._delay = delay
        self._due = due
        self._items: list[Item] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: Item) -> None:
        self._items.append(item)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._expired)

    def add_all(self, items: Iterable[Item]) -> None:
        for item in items:
            self.add(item)

    def take(self) -> list[Item]:
        """Everything queued, in order; the delay starts again with the next item."""
        items, self._items = self._items, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return items

    def _expired(self) -> None:
        self._timer = None
        items = self.take()
        if items:
            self._due(items)
