"""A keyed work queue: each key waits at most once, is worked on by one worker at a time, and is retried later.

A FineTuneJob's status depends on three kinds of objects (the job, its PyTorchJob, its pods), each watched
separately. Handled as they come, events of a job's pod and of its PyTorchJob would race into conflicting
status writes, and a burst of events would cost one full reconcile each. This is client-go's `workqueue` in the few lines Python needs (no maintained Python port
exists): a key added while it waits is not added twice, a key added while a worker has it is worked on again
once that worker is done, and a failed key comes back after a growing delay. One departure: a key added now
no longer waits for a delayed add of it as well (client-go would run it twice); the reconcile that runs now
sees everything the delayed one would have, and a failure schedules its own retry.

Keys can also be added `first`: they go ahead of every other ready key. The operator adds a new job so, to
create its children before it writes anyone's status (see `Reconciler.job_event`). client-go's queue has no
such lane; controller-runtime's priority queue makes the same kind of choice, serving objects that just
changed before the reconciles of a start-up or a resync. The lanes are strict: while new jobs keep coming
faster than the workers give them children, everything else waits (a burst of submissions, not a state
the operator stays in).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
Waited = Callable[[bool, float], None]
"""Told, as a worker takes a key, whether it came from the `first` lane and how many seconds it waited."""


class WorkQueue(Generic[K]):
    """Thread-safe; `get` blocks until a key is ready or the queue is shut down."""

    def __init__(
        self, base_delay: float = 0.5, max_delay: float = 60.0, waited: Waited | None = None
    ) -> None:
        self.base_delay, self.max_delay = base_delay, max_delay
        self._waited = waited
        self._since: dict[K, float] = {}
        """When each waiting key started waiting: added, or due after its delay (as client-go times it)."""
        self._ready: deque[K] = deque()
        self._first: deque[K] = deque()
        """Ready keys added `first`: served before any in `_ready`."""
        self._waiting: dict[K, bool] = {}
        """Keys in a lane, or that will be once their worker is done; the value says which lane."""
        self._busy: set[K] = set()
        self._later: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        """When each delayed key is due; heap entries that disagree with it were superseded."""
        self._order = itertools.count()
        self._failures: dict[K, int] = {}
        self._shut = False
        self._changed = threading.Condition()

    def add(self, key: K, first: bool = False) -> None:
        """Queue the key; `first` puts it ahead of every key added without it. A key keeps the lane it
        waits in, except that one added `first` while a worker has it comes back `first`."""
        with self._changed:
            self._due.pop(key, None)
            self._add(key, first)

    def _add(self, key: K, first: bool = False) -> None:
        if self._shut:
            return
        if key in self._waiting:
            if first and key in self._busy:
                self._waiting[key] = True
            return
        self._waiting[key] = first
        self._since[key] = time.monotonic()
        if key not in self._busy:
            self._lane(first).append(key)
            self._changed.notify()

    def _lane(self, first: bool) -> deque[K]:
        return self._first if first else self._ready

    def add_after(self, key: K, seconds: float) -> None:
        """Add the key in `seconds`, unless it is due sooner already."""
        with self._changed:
            at = time.monotonic() + seconds
            if self._shut or self._due.get(key, at) < at:
                return
            self._due[key] = at
            heapq.heappush(self._later, (at, next(self._order), key))
            self._changed.notify()

    def retry(self, key: K) -> float:
        """Add the key again after a delay that doubles with each failure in a row; returns the delay."""
        with self._changed:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = float(min(self.base_delay * 2.0**failures, self.max_delay))
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts the delays over."""
        with self._changed:
            self._failures.pop(key, None)

    def get(self) -> K | None:
        """The next ready key, now owned by the caller until `done`; None once shut down."""
        with self._changed:
            while True:
                if self._shut:
                    return None
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    at, _, due = heapq.heappop(self._later)
                    if self._due.get(due) == at:
                        del self._due[due]
                        self._add(due)
                if lane := self._first or self._ready:
                    key = lane.popleft()
                    del self._waiting[key]
                    self._busy.add(key)
                    waited = max(0.0, now - self._since.pop(key, now))
                    break
                timeout = self._later[0][0] - now if self._later else None
                self._changed.wait(timeout)
        if self._waited is not None:
            self._waited(lane is self._first, waited)
        return key

    def done(self, key: K) -> None:
        with self._changed:
            self._busy.discard(key)
            if key in self._waiting:
                self._lane(self._waiting[key]).append(key)
                self._changed.notify()

    def depth(self) -> int:
        """Keys waiting for a worker: ready now, due later (a retry), or queued again while being worked on."""
        with self._changed:
            return len(self._waiting.keys() | self._due.keys())

    def first_waiting(self) -> bool:
        """Whether a key added `first` is ready and waiting for a worker."""
        with self._changed:
            return bool(self._first)

    def shut_down(self) -> None:
        with self._changed:
            self._shut = True
            self._changed.notify_all()
