"""Leader election on a coordination.k8s.io Lease, so that standby replicas wait instead of reconciling.

Kept beside kopf because kopf peering elects no leader: replicas of one priority all pause, and a replica
given a higher one blocks the others for the peering lifetime (60 s) after it dies, where a Lease hands
over in its duration (15 s), or at once on SIGTERM.

The election itself is the kubernetes client's `LeaderElection` with a `LeaseLock` (the same Lease protocol
as client-go: holder, duration, renew time, optimistic concurrency on resourceVersion). What this module adds
is what an operator needs around it:

- a standby runs kopf (its watches and liveness probe) and reconciles nothing until it leads;
- a leader that cannot renew its Lease exits at once (as controller-runtime does), before a standby can take
  over, so two replicas never reconcile together; Kubernetes restarts the container as a new standby;
- a leader that stops on its own (SIGTERM on a rollout) hands the Lease back, so its successor starts at once
  instead of after the lease duration;
- the Lease is owned by the replicas' ServiceAccount, so `helm uninstall` (which deletes the Role before the
  pods stop, so no replica can delete it) leaves no Lease behind: the garbage collector removes it with the
  ServiceAccount.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseSettings:
    """client-go's defaults: a standby takes over 15-17 s after a leader vanished without handing back."""

    name: str
    namespace: str
    identity: str
    lease_duration_seconds: int = 15
    renew_deadline_seconds: int = 10
    retry_period_seconds: int = 2


SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


def service_account_owner(namespace: str) -> list[client.V1OwnerReference]:
    """An owner reference to this process's ServiceAccount when it runs as one in `namespace` (as the chart's
    replicas do), else none. A SelfSubjectReview answers who we are; every authenticated user may ask."""
    try:
        review = client.AuthenticationV1Api().create_self_subject_review(
            client.V1SelfSubjectReview(api_version="authentication.k8s.io/v1", kind="SelfSubjectReview")
        )
    except ApiException as error:
        log.info("the leader lease gets no owner: who-am-I review refused (%s)", error.reason)
        return []
    user = review.status.user_info if review.status else None
    parts = (user.username or "").removeprefix(SERVICE_ACCOUNT_PREFIX).split(":") if user else []
    if user is None or not user.uid or len(parts) != 2 or parts[0] != namespace:
        return []
    return [client.V1OwnerReference(api_version="v1", kind="ServiceAccount", name=parts[1], uid=user.uid)]


class _StoppableLeaseLock(LeaseLock):
    """A LeaseLock that stops writing once ``stopped`` is set, so a released Lease is not taken again, and
    that puts `owners` on the Lease at its holder's first renewal (the library's create takes no metadata)."""

    def __init__(
        self, settings: LeaseSettings, stopped: threading.Event, owners: list[client.V1OwnerReference]
    ) -> None:
        super().__init__(settings.name, settings.namespace, settings.identity)  # type: ignore[no-untyped-call]
        self.stopped, self.owners = stopped, owners

    def create(self, name: str, namespace: str, election_record: object) -> bool:
        return not self.stopped.is_set() and bool(super().create(name, namespace, election_record))  # type: ignore[no-untyped-call]

    def update(self, name: str, namespace: str, updated_record: object) -> bool:
        lease = self.lease_reference
        if (
            lease is not None
            and lease.metadata is not None
            and self.owners
            and not lease.metadata.owner_references
        ):
            lease.metadata.owner_references = self.owners
        return not self.stopped.is_set() and bool(super().update(name, namespace, updated_record))  # type: ignore[no-untyped-call]


def _exit_lost_lease(stopped: threading.Event) -> None:
    if stopped.is_set():
        return
    log.error("lost the leader lease; exiting so that no two replicas reconcile at once")
    logging.shutdown()
    os._exit(1)  # the workers may be mid-reconcile; only a hard exit is sure to stop reconciling now


def release(settings: LeaseSettings) -> None:
    """Hand the Lease back if this process still holds it (clear the holder, as client-go's ReleaseOnCancel)."""
    api = client.CoordinationV1Api()
    try:
        lease = api.read_namespaced_lease(settings.name, settings.namespace)
        if lease.spec is None or lease.spec.holder_identity != settings.identity:
            return
        lease.spec.holder_identity = None
        lease.spec.lease_duration_seconds = 1
        lease.spec.renew_time = datetime.now(UTC)
        api.replace_namespaced_lease(settings.name, settings.namespace, lease)
        log.info("handed the leader lease %s/%s back", settings.namespace, settings.name)
    except ApiException as error:
        log.warning(
            "could not hand the leader lease back (%s); a standby takes over when it expires", error.reason
        )


class LeaseHolder:
    """Competes for the Lease in a thread; calls `on_leading` once this process holds it."""

    def __init__(self, settings: LeaseSettings, on_leading: Callable[[], object]) -> None:
        self.settings, self.on_leading = settings, on_leading
        self._stopped = threading.Event()

    def start(self) -> None:
        election = leaderelection.LeaderElection(  # type: ignore[no-untyped-call]
            electionconfig.Config(  # type: ignore[no-untyped-call]
                _StoppableLeaseLock(
                    self.settings, self._stopped, service_account_owner(self.settings.namespace)
                ),
                lease_duration=self.settings.lease_duration_seconds,
                renew_deadline=self.settings.renew_deadline_seconds,
                retry_period=self.settings.retry_period_seconds,
                onstarted_leading=self._lead,
                onstopped_leading=lambda: _exit_lost_lease(self._stopped),
            )
        )
        log.info(
            "standby %s: waiting for the leader lease %s/%s",
            self.settings.identity,
            self.settings.namespace,
            self.settings.name,
        )
        threading.Thread(target=election.run, name="leader-election", daemon=True).start()

    def _lead(self) -> None:
        log.info("%s leads: reconciling", self.settings.identity)
        self.on_leading()

    def stop(self) -> None:
        """Stop competing, and hand the Lease back if this process holds it (once)."""
        if not self._stopped.is_set():
            self._stopped.set()
            release(self.settings)
