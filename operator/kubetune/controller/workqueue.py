"""A keyed work queue: each key waits at most once, is worked on by one worker at a time, and is retried later.

A FineTuneJob's status depends on three kinds of objects (the job, its PyTorchJob, its pods), each watched
separately. Handled as they come, events of a job's pod and of its PyTorchJob would race into conflicting
status writes, and a burst of events would cost one full reconcile each. This is client-go's `workqueue` in the few lines Python needs (no maintained Python port
exists): a key added while it waits is not added twice, a key added while a worker has it is worked on again
once that worker is done, and a failed key comes back after a growing delay. One departure: a key added now
no longer waits for a delayed add of it as well (client-go would run it twice); the reconcile that runs now
sees everything the delayed one would have, and a failure schedules its own retry.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Thread-safe; `get` blocks until a key is ready or the queue is shut down."""

    def __init__(self, base_delay: float = 0.5, max_delay: float = 60.0) -> None:
        self.base_delay, self.max_delay = base_delay, max_delay
        self._ready: deque[K] = deque()
        self._waiting: set[K] = set()
        """Keys in `_ready`, or that will be once their worker is done."""
        self._busy: set[K] = set()
        self._later: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        """When each delayed key is due; heap entries that disagree with it were superseded."""
        self._order = itertools.count()
        self._failures: dict[K, int] = {}
        self._shut = False
        self._changed = threading.Condition()

    def add(self, key: K) -> None:
        with self._changed:
            self._due.pop(key, None)
            self._add(key)

    def _add(self, key: K) -> None:
        if self._shut or key in self._waiting:
            return
        self._waiting.add(key)
        if key not in self._busy:
            self._ready.append(key)
            self._changed.notify()

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
                if self._ready:
                    key = self._ready.popleft()
                    self._waiting.discard(key)
                    self._busy.add(key)
                    return key
                timeout = self._later[0][0] - now if self._later else None
                self._changed.wait(timeout)

    def done(self, key: K) -> None:
        with self._changed:
            self._busy.discard(key)
            if key in self._waiting:
                self._ready.append(key)
                self._changed.notify()

    def depth(self) -> int:
        """Keys waiting for a worker: ready now, due later (a retry), or queued again while being worked on."""
        with self._changed:
            return len(self._waiting | self._due.keys())

    def shut_down(self) -> None:
        with self._changed:
            self._shut = True
            self._changed.notify_all()
