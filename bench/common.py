"""What every benchmark shares: where results go, the machine block, percentiles and Markdown tables.

A benchmark module `bench/<name>.py` writes `docs/benchmarks/<name>.json` (with the `machine` block made here)
and `docs/benchmarks/<name>-*.png`, and renders its own section of docs/benchmarks.md from that JSON.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_DIR / "docs" / "benchmarks"


def results_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def plot_path(name: str, what: str) -> Path:
    return RESULTS_DIR / f"{name}-{what}.png"


def save_figure(figure: Any, name: str, what: str) -> str:
    """Lays out a matplotlib figure and writes it as docs/benchmarks/<name>-<what>.png; returns the file name.

    One resolution for every plot of the page; the figure is closed, so a long run does not keep them all.
    """
    import matplotlib.pyplot as plt

    path = plot_path(name, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def write_results(name: str, results: dict[str, Any]) -> Path:
    """docs/benchmarks/<name>.json, stable key order so that a rerun diffs readably."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def load_results(name: str, folder: Path = RESULTS_DIR) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


# ------------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() or None
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def describe_machine(packages: Iterable[str], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The machine block as a run starts: hardware, versions, the exact command and the load average now.

    Timings on a shared 2-core machine swing with what else runs, so the load at start and end travels with
    every number (`finish_machine` adds the end).
    """
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    command = argv if argv is not None else [Path(sys.executable).name, "-m", *_module_argv()]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memoryGiB": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "command": shlex.join(command),
        "gitCommit": _git_commit(),
        "startedAt": _now(),
        "loadAverage": {"start": [round(x, 2) for x in os.getloadavg()]},
    }


def _module_argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return [module, *sys.argv[1:]]


def finish_machine(machine: dict[str, Any]) -> dict[str, Any]:
    """Adds the end time and the load average at the end to a block from `describe_machine`."""
    machine["finishedAt"] = _now()
    machine["loadAverage"]["end"] = [round(x, 2) for x in os.getloadavg()]
    return machine


# ------------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between the nearest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], digits: int = 4) -> dict[str, float | int | None]:
    """count, p50, p95, p99, max and mean of a sample; the statistics are None for an empty one."""
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), digits),
        "p95": round(percentile(values, 95), digits),
        "p99": round(percentile(values, 99), digits),
        "max": round(max(values), digits),
        "mean": round(sum(values) / len(values), digits),
    }


# --------------------------------------------------------------------------------------------- Markdown


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; None shows as an em dash."""

    def cell(value: object) -> str:
        return "—" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine_markdown(machine: dict[str, Any]) -> str:
    """The machine block as a short list, for a report section."""
    load = machine.get("loadAverage") or {}
    packages = ", ".join(f"{k} {v}" for k, v in (machine.get("packages") or {}).items() if v)
    lines = [
        f"- CPU: {machine.get('cpu')} ({machine.get('cores')} cores), {machine.get('memoryGiB')} GiB RAM",
        f"- Python {machine.get('python')} on {machine.get('os')}",
        f"- packages: {packages or '—'}",
        f"- load average (1, 5, 15 min) at start {load.get('start')}, at end {load.get('end')}",
        f"- run from {machine.get('startedAt')} to {machine.get('finishedAt')}, commit {machine.get('gitCommit')}",
        f"- command: `{machine.get('command')}`",
    ]
    return "\n".join(lines) + "\n"
