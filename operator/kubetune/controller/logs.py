"""The operator's log format: one JSON object per line (for a log pipeline), or plain lines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s [%(levelname)-7s] %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """`{"timestamp", "severity", "logger", "message"[, "exception"]}` per line. The standard library's
    Formatter and json.dumps do it in these few lines; a logging dependency would add nothing."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "severity": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(verbose: bool, json_logs: bool) -> None:
    """Everything at INFO (DEBUG with `verbose`) to stderr, in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_logs else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # A standby's election loop logs "is a follower" at INFO every retry period; leader.py logs the
        # transitions that matter.
        logging.getLogger("leaderelection").setLevel(logging.WARNING)
