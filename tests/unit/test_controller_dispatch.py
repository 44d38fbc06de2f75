"""How reconciles are run: triggers of one job fold into one reconcile, a trigger during a reconcile runs it
once more after, a failure is retried after a growing delay, a standby runs nothing."""

from __future__ import annotations

import threading
import time
from typing import Any

from kubetune.controller.handlers import MAX_RETRY_SECONDS, Dispatch, retry_delay

KEY = ("team", "llama")


class Reconciles:
    """Stands in for the Reconciler: records each reconcile, and can hold one or fail a few."""

    def __init__(self, fail: int = 0) -> None:
        self.done: list[tuple[str, str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.fail = fail

    def reconcile(self, key: tuple[str, str]) -> None:
        self.started.set()
        self.hold.wait(5)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the API server is away")
        self.done.append(key)

    requeue: Any = None
    first_waiting: Any = None


def until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def dispatch(reconciles: Reconciles, leading: bool = True) -> Dispatch:
    flag = threading.Event()
    if leading:
        flag.set()
    return Dispatch(reconciles, workers=2, leading=flag)  # type: ignore[arg-type]


def test_triggers_while_a_job_waits_fold_into_one_reconcile_and_one_during_it_runs_it_once_more() -> None:
    reconciles = Reconciles()
    reconciles.hold.clear()
    runs = dispatch(reconciles)
    runs.submit(KEY)
    assert reconciles.started.wait(5)
    for _ in range(5):
        runs.submit(KEY)  # while it runs: one more reconcile after it, not five
    reconciles.hold.set()
    assert until(lambda: len(reconciles.done) == 2)
    time.sleep(0.2)
    assert reconciles.done == [KEY, KEY]
    runs.stop()


def test_a_new_job_waiting_for_its_children_is_seen_by_the_others() -> None:
    reconciles = Reconciles()
    reconciles.hold.clear()
    runs = dispatch(reconciles)
    runs.submit(("team", "a"))
    runs.submit(("team", "b"))
    assert reconciles.started.wait(5)
    runs.submit(("team", "c"), first=True)
    assert runs.first_waiting()
    reconciles.hold.set()
    assert until(lambda: len(reconciles.done) == 3) and not runs.first_waiting()
    runs.stop()


def test_a_failed_reconcile_is_retried_after_a_growing_delay() -> None:
    reconciles = Reconciles(fail=2)
    runs = dispatch(reconciles)
    began = time.monotonic()
    runs.submit(KEY)
    assert until(lambda: reconciles.done == [KEY], timeout=5)
    assert time.monotonic() - began >= retry_delay(1) + retry_delay(2) - 0.05
    assert [retry_delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0] and retry_delay(30) == MAX_RETRY_SECONDS
    runs.stop()


def test_a_standby_reconciles_nothing() -> None:
    reconciles = Reconciles()
    runs = dispatch(reconciles, leading=False)
    runs.submit(KEY)
    time.sleep(0.2)
    assert reconciles.done == []
    runs.stop()
