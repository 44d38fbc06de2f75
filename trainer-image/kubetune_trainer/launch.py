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
"""

from __future__ import annotations

import logging
import sys

from .termination import EXIT_PEER_LOST

log = logging.getLogger("kubetune_trainer.launch")


def container_exit_code(worker_exit_code: int) -> int:
    """A worker's exit status as a container's exit code: negative (killed by signal N) becomes 128 + N."""
    return 128 - worker_exit_code if worker_exit_code < 0 else worker_exit_code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        log.error(
            "rendezvous with the other nodes failed (%s: %s); exiting %d",
            type(error).__name__,
            error,
            EXIT_PEER_LOST,
        )
        return EXIT_PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
