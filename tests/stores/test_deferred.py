"""stores/deferred.py: records wait for the next call, or go on their own after the delay."""

from __future__ import annotations

import asyncio

from stores.deferred import Deferred


async def test_items_taken_before_the_delay_are_never_due() -> None:
    due: list[list[int]] = []
    deferred: Deferred[int] = Deferred(0.3, due.append)
    deferred.add(1)
    deferred.add_all([2, 3])
    assert deferred.take() == [1, 2, 3]
    assert deferred.take() == []
    await asyncio.sleep(0.5)
    assert due == []


async def test_items_left_alone_are_due_once_in_order() -> None:
    due: list[list[int]] = []
    deferred: Deferred[int] = Deferred(0.3, due.append)
    deferred.add_all([1, 2])
    await asyncio.sleep(0.1)
    deferred.add(3)  # the delay counts from the first item waiting
    await asyncio.sleep(0.35)
    assert due == [[1, 2, 3]]
    assert deferred.take() == []
    await asyncio.sleep(0.4)
    assert due == [[1, 2, 3]]


async def test_after_a_take_the_next_item_starts_a_new_delay() -> None:
    due: list[list[int]] = []
    deferred: Deferred[int] = Deferred(0.3, due.append)
    deferred.add(1)
    await asyncio.sleep(0.2)
    assert deferred.take() == [1]
    deferred.add(2)
    await asyncio.sleep(0.2)  # 0.4 s after the first item: its delay must not fire for 2
    assert due == []
    await asyncio.sleep(0.3)
    assert due == [[2]]
