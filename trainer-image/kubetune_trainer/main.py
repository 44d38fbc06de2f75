"""``kubetune-train`` / ``python -m kubetune_trainer``: read the spec, train, publish.

The spec path comes from ``--spec`` or ``KUBETUNE_SPEC`` (the renderer mounts the
ConfigMap there). Any fatal error ends as one line in the termination log and a
non-zero exit; a preempted run exits 143 after its checkpoint, so the PyTorchJob
restarts it and it resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from .termination import SpecError, fail, write_adapter_summary

EXIT_PREEMPTED = 143  # 128 + SIGTERM: a retryable exit code for the training operator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kubetune-train", description="Run one FineTuneJob's training process."
    )
    parser.add_argument(
        "--spec", type=Path, default=os.environ.get("KUBETUNE_SPEC"), help="FineTuneJob (JSON or YAML)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=os.environ.get("KUBETUNE_WORKDIR"),
        help="node-local scratch folder (default: a folder under the system temp dir)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Tokenizers' own threads fight the data loader's and torch's for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.spec is None:
            raise SpecError("no spec: pass --spec FILE or set KUBETUNE_SPEC")
        # Imported here so that a missing spec fails in milliseconds, not after importing torch.
        from .job import load_job
        from .train import run

        job, digest = load_job(args.spec)
        workdir = args.workdir or Path(tempfile.gettempdir()) / "kubetune" / job.name
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(job, digest, workdir)
    except SystemExit:
        raise
    except BaseException as error:
        logging.getLogger("kubetune_trainer").exception("training failed")
        fail(error)
    if result.preempted:
        print(
            f"preempted: checkpoint at step {result.global_step} written; exiting to be restarted",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    if result.manifest is not None:  # global rank 0, after publishing
        print(
            f"published {result.manifest['uri']} (sha256 of kubetune-manifest.json {result.manifest['manifestSha256']})",
            flush=True,
        )
        write_adapter_summary(result.manifest)
        if report_dir := os.environ.get("KUBETUNE_REPORT_DIR"):  # set by `kubetune run`
            from .report import write_report

            write_report(
                Path(report_dir),
                result.log_history,
                result.manifest,
                result.trainable_params,
                result.total_params,
            )
    return 0
