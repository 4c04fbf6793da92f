"""Waiting jobs served fairly across owners: of the owners with jobs waiting, the one served longest ago
goes next (one never served first), and of its jobs the oldest. One owner's burst of a hundred jobs
therefore delays another owner's single job by at most one job per other waiting owner."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Owned(Protocol):
    owner: str | None


T = TypeVar("T", bound=Owned)


class FairQueue(Generic[T]):
    """Per-owner FIFOs; `popleft` takes the next item by turn. Not thread-safe: the caller locks."""

    def __init__(self) -> None:
        self._waiting: dict[str | None, deque[T]] = {}
        self._served: dict[str | None, int] = {}  # owner -> the turn it was last served
        self._turn = 0

    def __len__(self) -> int:
        return sum(len(items) for items in self._waiting.values())

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __contains__(self, item: T) -> bool:
        return any(item in items for items in self._waiting.values())

    def __iter__(self) -> Iterator[T]:
        """Every waiting item, in the order `popleft` would hand them out if nothing else arrived."""
        waiting = {owner: deque(items) for owner, items in self._waiting.items()}
        served, turn = dict(self._served), self._turn
        while waiting:
            owner = _next_owner(waiting, served)
            yield waiting[owner].popleft()
            if not waiting[owner]:
                del waiting[owner]
            turn += 1
            served[owner] = turn

    def append(self, item: T) -> None:
        self._waiting.setdefault(item.owner, deque()).append(item)

    def peek(self) -> T:
        """The item `popleft` would return; IndexError when empty."""
        if not self._waiting:
            raise IndexError("peek from an empty FairQueue")
        return self._waiting[_next_owner(self._waiting, self._served)][0]

    def popleft(self) -> T:
        if not self._waiting:
            raise IndexError("pop from an empty FairQueue")
        owner = _next_owner(self._waiting, self._served)
        items = self._waiting[owner]
        item = items.popleft()
        if not items:
            del self._waiting[owner]
        self._turn += 1
        self._served[owner] = self._turn
        return item

    def remove(self, item: T) -> None:
        items = self._waiting[item.owner]
        items.remove(item)
        if not items:
            del self._waiting[item.owner]

    def clear(self) -> list[T]:
        """Empty the queue; returns what waited."""
        items = list(self)
        self._waiting.clear()
        return items


def _next_owner(waiting: dict[str | None, deque], served: dict[str | None, int]) -> str | None:
    # min() keeps the first of equals and dicts keep insertion order: owners never served go in the
    # order they arrived
    return min(waiting, key=lambda owner: served.get(owner, 0))
