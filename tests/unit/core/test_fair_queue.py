"""`FairQueue`: owners take turns, each owner's jobs in order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from octoflux.core.fair_queue import FairQueue


@dataclass(eq=False)
class Item:
    owner: str | None
    name: str


def drain(queue: FairQueue) -> list[str]:
    return [queue.popleft().name for _ in range(len(queue))]


def test_a_single_owner_is_served_first_in_first_out():
    queue = FairQueue()
    for n in range(5):
        queue.append(Item("a", f"a{n}"))
    assert drain(queue) == ["a0", "a1", "a2", "a3", "a4"]


def test_another_owner_s_job_goes_next_after_one_of_a_burst():
    queue = FairQueue()
    for n in range(12):
        queue.append(Item("a", f"a{n}"))
    assert queue.popleft().name == "a0"
    queue.append(Item("b", "b0"))
    assert drain(queue)[:2] == ["b0", "a1"]


def test_owners_take_turns_and_the_anonymous_owner_is_one_of_them():
    queue = FairQueue()
    for name in ["a0", "a1", "a2", "b0", "b1"]:
        queue.append(Item(name[0], name))
    queue.append(Item(None, "n0"))
    assert drain(queue) == ["a0", "b0", "n0", "a1", "b1", "a2"]


def test_an_owner_that_comes_back_waits_for_its_turn():
    queue = FairQueue()
    queue.append(Item("a", "a0"))
    assert queue.popleft().name == "a0"
    queue.append(Item("a", "a1"))
    queue.append(Item("b", "b0"))
    assert drain(queue) == ["b0", "a1"]


def test_iteration_peek_remove_and_clear_follow_the_serving_order():
    queue = FairQueue()
    items = [Item("a", "a0"), Item("a", "a1"), Item("b", "b0")]
    for item in items:
        queue.append(item)
    assert [item.name for item in queue] == ["a0", "b0", "a1"] and len(queue) == 3
    assert queue.peek().name == "a0" and len(queue) == 3
    queue.remove(items[0])
    assert items[0] not in queue and items[1] in queue
    assert [item.name for item in queue.clear()] == ["a1", "b0"]
    assert not queue and len(queue) == 0
    with pytest.raises(IndexError):
        queue.popleft()
