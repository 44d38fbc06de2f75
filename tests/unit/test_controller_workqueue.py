"""The reconcile queue: a job is worked on by one worker at a time, events pile into one reconcile, failures
come back later."""

from __future__ import annotations

import threading
import time

from kubetune.controller.workqueue import WorkQueue


def test_a_key_added_many_times_while_waiting_is_worked_on_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        queue.add("ns/a")
    queue.add("ns/b")
    assert queue.depth() == 2
    assert queue.get() == "ns/a"
    assert queue.get() == "ns/b"
    assert queue.depth() == 0


def test_a_key_added_while_a_worker_has_it_comes_back_only_after_done() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("ns/a")
    assert queue.get() == "ns/a"
    queue.add("ns/a")  # an event arrives mid-reconcile
    queue.add("ns/a")
    assert queue.depth() == 1, "it waits, once"
    second: list[str | None] = []
    worker = threading.Thread(target=lambda: second.append(queue.get()), daemon=True)
    worker.start()
    worker.join(timeout=0.2)
    assert second == [], "no second worker may take a key that is being worked on"
    queue.done("ns/a")
    worker.join(timeout=2)
    assert second == ["ns/a"]
    queue.done("ns/a")
    assert queue.depth() == 0


def test_failures_come_back_after_a_doubling_delay_and_success_resets_it() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.05, max_delay=0.15)
    delays = [queue.retry("ns/a") for _ in range(4)]
    assert delays == [0.05, 0.1, 0.15, 0.15]
    assert queue.depth() == 1, "a key due later still counts as waiting"
    queue.forget("ns/a")
    assert queue.retry("ns/a") == 0.05
    started = time.monotonic()
    assert queue.get() == "ns/a"
    assert time.monotonic() - started >= 0.04


def test_shut_down_wakes_a_waiting_worker() -> None:
    queue: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    time.sleep(0.05)
    queue.shut_down()
    worker.join(timeout=2)
    assert not worker.is_alive() and got == [None]
    queue.add("ns/a")
    assert queue.depth() == 0, "a shut queue takes nothing new"


def test_concurrent_workers_never_hold_the_same_key() -> None:
    queue: WorkQueue[int] = WorkQueue()
    holding: set[int] = set()
    clashes: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        while (key := queue.get()) is not None:
            with lock:
                if key in holding:
                    clashes.append(key)
                holding.add(key)
            time.sleep(0.001)
            with lock:
                holding.discard(key)
            queue.done(key)

    workers = [threading.Thread(target=work) for _ in range(8)]
    for worker in workers:
        worker.start()
    for round_ in range(200):
        queue.add(round_ % 5)
    time.sleep(0.3)
    queue.shut_down()
    for worker in workers:
        worker.join(timeout=5)
    assert clashes == []


def test_a_key_added_now_does_not_also_wait_for_its_delayed_add() -> None:
    """A restarted operator delays a job whose PyTorchJob the watch has not listed yet; when the
    PyTorchJob's event comes first, the job runs then, and once."""
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("ns/a", 0.05)
    queue.add_after("ns/a", 10)  # a later time for a key due sooner changes nothing
    assert queue.depth() == 1
    queue.add("ns/a")
    assert queue.get() == "ns/a"
    queue.done("ns/a")
    assert queue.depth() == 0
    time.sleep(0.1)
    queue.add("ns/b")
    assert queue.get() == "ns/b", "the superseded delayed add of ns/a does not come back"


def test_keys_added_first_are_served_before_every_other_ready_key() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("ns/status-a")
    queue.add("ns/status-b")
    assert not queue.first_waiting()
    queue.add("ns/new-c", first=True)
    queue.add("ns/new-d", first=True)
    queue.add("ns/new-c", first=True)
    assert queue.first_waiting()
    assert queue.depth() == 4
    assert [queue.get() for _ in range(4)] == ["ns/new-c", "ns/new-d", "ns/status-a", "ns/status-b"]
    assert not queue.first_waiting()


def test_a_key_keeps_its_lane_and_one_re_added_first_while_worked_on_comes_back_first() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("ns/a")
    queue.add("ns/a", first=True)  # already waiting: not served twice, and not moved
    queue.add("ns/b", first=True)
    assert queue.get() == "ns/b"
    queue.add("ns/b")  # an event mid-reconcile ...
    queue.add("ns/b", first=True)  # ... and a new job's event: it comes back ahead
    queue.done("ns/b")
    assert queue.get() == "ns/b"
    queue.done("ns/b")
    assert queue.get() == "ns/a"
    assert queue.depth() == 0


def test_each_key_taken_says_its_lane_and_how_long_it_waited_since_it_was_added() -> None:
    """What `kubetune_operator_queue_wait_seconds` is made of; a key re-added while worked on waits from then,
    its wait including the rest of that reconcile (as client-go counts it)."""
    waits: list[tuple[bool, float]] = []
    queue: WorkQueue[str] = WorkQueue(waited=lambda first, seconds: waits.append((first, seconds)))
    queue.add("ns/old")
    time.sleep(0.05)
    queue.add("ns/new", first=True)
    assert queue.get() == "ns/new"
    assert queue.get() == "ns/old"
    assert [first for first, _ in waits] == [True, False]
    assert waits[1][1] >= 0.05 and waits[1][1] > waits[0][1], "the old key waited through the new one's turn"
    queue.add("ns/old")  # an event while a worker has it
    time.sleep(0.05)
    queue.done("ns/old")
    assert queue.get() == "ns/old"
    assert waits[2][0] is False and waits[2][1] >= 0.05
