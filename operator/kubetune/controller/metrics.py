"""The operator's own Prometheus metrics (not the trainer's): reconciles, errors, durations, jobs by phase."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune.api.v1alpha1 import Phase

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "kubetune_operator_reconciles",
    "Reconciles by the kind of object reconciled (FineTuneJob) and their result (success or error).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "kubetune_operator_reconcile_errors",
    "Failed reconciles by kind and error class (e.g. ApiException, TemporaryError).",
    ["kind", "reason"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Time one reconcile took.",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WATCH_EVENTS = Counter(
    "kubetune_operator_watch_events",
    "Watch events received, by the kind of object (FineTuneJob, PyTorchJob, Pod).",
    ["kind"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "kubetune_operator_queue_depth",
    "FineTuneJobs waiting for a worker (a lasting backlog means too few workers or a slow API server).",
    registry=REGISTRY,
)

QUEUE_WAIT = Histogram(
    "kubetune_operator_queue_wait_seconds",
    "Time a FineTuneJob waited for a worker, by lane: `first` for a new job awaiting its PyTorchJob (the "
    "larger part of the time to its PyTorchJob in a burst of submissions), `ordinary` for every other reconcile.",
    ["lane"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

# Both series exist, at zero, from the first scrape; and every worker's take skips the label lookup.
QUEUE_WAIT_BY_LANE = {True: QUEUE_WAIT.labels(lane="first"), False: QUEUE_WAIT.labels(lane="ordinary")}


def queue_waited(first: bool, seconds: float) -> None:
    QUEUE_WAIT_BY_LANE[first].observe(seconds)


@contextmanager
def reconcile(kind: str) -> Iterator[None]:
    """Counts and times one reconcile; an exception counts as an error and goes on up."""
    started = time.monotonic()
    try:
        yield
    except Exception as error:
        RECONCILES.labels(kind=kind, result="error").inc()
        RECONCILE_ERRORS.labels(kind=kind, reason=type(error).__name__).inc()
        raise
    else:
        RECONCILES.labels(kind=kind, result="success").inc()
    finally:
        RECONCILE_DURATION.labels(kind=kind).observe(time.monotonic() - started)


PHASE_NAMES = frozenset(phase.value for phase in Phase)
PENDING = Phase.PENDING.value


class JobPhases(Collector):
    """The FineTuneJobs this operator watches by phase, counted in one pass over the store at each scrape (a
    job without a phase yet counts as Pending). A Gauge per phase with set_function would pass over the store
    once per phase."""

    NAME = "kubetune_operator_finetunejobs"
    HELP = "FineTuneJobs this operator watches, by phase."

    def __init__(self) -> None:
        self.phases: Callable[[], Iterable[str | None]] = tuple

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = collections.Counter(phase if phase in PHASE_NAMES else PENDING for phase in self.phases())
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["phase"])
        for name in sorted(PHASE_NAMES):
            family.add_metric([name], counts[name])
        yield family


JOB_PHASES = JobPhases()
REGISTRY.register(JOB_PHASES)


def count_job_phases(phases: Callable[[], Iterable[str | None]]) -> None:
    """Count, at each scrape, the phases `phases` returns: every known job's."""
    JOB_PHASES.phases = phases
