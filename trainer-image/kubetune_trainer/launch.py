"""``python -m kubetune_trainer.launch``: torchrun, exiting with a code the pod's restart policy can act on.

The PyTorchJob's replicas run with ``restartPolicy: ExitCode``: the training operator re-creates a pod whose
container exits with 128 or more (a signal: OOM kill, SIGTERM on preemption) and fails the whole job on 1-127
(a bad spec, a bug). torchrun exits 1 whenever a worker fails and whenever it is signalled itself, so under
plain torchrun every failure is permanent: a pod preempted with SIGTERM, or the surviving node of a pair whose
other node died, would fail a job its checkpoint could have resumed. This runs the same torchrun (same
arguments) and exits with the code of the root cause instead:

- the first failed worker's exit code (the trainer's: 1 user error, 2 internal error, 143 preempted,
  ``EXIT_PEER_LOST`` when a collective failed because another rank went away);
- 128 + N for a worker killed by signal N (the OOM killer's SIGKILL gives 137);
- 128 + N when torchrun itself got signal N, after its workers stopped (pod deletion, preemption);
- ``EXIT_PEER_LOST`` when the rendezvous with the other nodes fails (the master's pod is gone or being
  replaced), so that this pod is re-created and meets the others again.

A re-created worker pod can start while the master of the round it replaces still runs (the master only
exits once its collective fails). torchrun's static rendezvous would let it join that dying master's store,
and the master that replaces it would then wait for a node that already checked in elsewhere, until the
rendezvous timed out. So a worker first marks its node rank in the master's store (compare-and-set) and
starts torchrun only on a store where that rank is not taken yet: a master of its own round.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from datetime import timedelta

from .termination import EXIT_PEER_LOST, write_termination_message

log = logging.getLogger("kubetune_trainer.launch")

FRESH_MASTER_WAIT_SECONDS = 900.0
"""How long a worker waits for the master of a new round before it starts anyway."""


def container_exit_code(worker_exit_code: int) -> int:
    """A worker's exit status as a container's exit code: negative (killed by signal N) becomes 128 + N."""
    return 128 - worker_exit_code if worker_exit_code < 0 else worker_exit_code


def round_key() -> str | None:
    """This node's key in the master's store, or None on the master (node rank 0) and outside a PyTorchJob."""
    rank = os.environ.get("PET_NODE_RANK", "0").strip() or "0"
    if rank == "0" or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return None
    return f"kubetune/{os.environ.get('KUBETUNE_JOB_NAME', 'job')}/node-{rank}"


def wait_for_a_fresh_master(
    addr: str, port: int, key: str, timeout: float = FRESH_MASTER_WAIT_SECONDS, poll: float = 1.0
) -> bool:
    """Claim `key` in the store at addr:port; True once claimed, False when `timeout` passed first.

    A store where the key is already claimed belongs to a round this node rank took part in before: its
    master is about to go away. Wait until a master of a new round serves the port.
    """
    from torch.distributed import DistError, TCPStore  # type: ignore[attr-defined]  # re-exported from torch._C

    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    told = False
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=2):
                pass  # a plain probe first: the store client logs every failed connect at length
            store = TCPStore(addr, port, None, False, timedelta(seconds=10), wait_for_workers=False)
            if store.compare_set(key, "", token) == token.encode():
                return True
            if not told:
                log.warning(
                    "the master at %s:%d still runs the round this node rank was in; waiting for its successor",
                    addr,
                    port,
                )
                told = True
        except (OSError, DistError):
            pass  # no master yet
        time.sleep(poll)
    return False


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = round_key()
    if key is not None and not wait_for_a_fresh_master(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), key
    ):
        log.warning("no master of a new round within %.0f s; starting anyway", FRESH_MASTER_WAIT_SECONDS)
    try:
        run(parse_args(argv))  # type: ignore[no-untyped-call]
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = container_exit_code(failure.exitcode)
        summary = error.format_msg()  # type: ignore[no-untyped-call]
        log.error("%s\nrank %d failed first; exiting %d", summary, rank, code)
        return code
    except SignalException as error:
        code = 128 + int(error.sigval)
        log.warning("torchrun got signal %s; its workers are stopped; exiting %d", error.sigval, code)
        return code
    except (RendezvousError, DistError) as error:
        log.error("rendezvous with the other nodes failed; exiting %d", EXIT_PEER_LOST)
        # Mostly no worker ran, so nothing else wrote the pod's termination message (a line one wrote first stays).
        write_termination_message(
            "PeerLost", f"rendezvous with the other nodes failed ({type(error).__name__}: {error})"
        )
        return EXIT_PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
