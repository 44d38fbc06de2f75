"""`kubetune`: generate the CRD, validate and render manifests, estimate memory, run a job locally.

The control-plane verbs import no training library. `estimate` and `run` hand over to the trainer
package (`kubetune_trainer`) in a child process, so this module stays free of torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from kubetune.api.crd import crd_yaml
from kubetune.api.reference import reference_markdown
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.validation import DocumentResult, validate_file, validate_manifest
from kubetune.render import RenderConfig, build_all
from kubetune.render.pytorchjob import spec_document
from kubetune.render.volumes import PVC_ROOT_ENV

app = typer.Typer(
    name="kubetune",
    help="Fine-tune large language models on Kubernetes with one FineTuneJob.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

FilesOption = Annotated[
    list[Path], typer.Option("--filename", "-f", help="Manifest file or folder (repeatable).")
]
FileOption = Annotated[
    Path, typer.Option("--filename", "-f", help="A FineTuneJob manifest.", exists=True, dir_okay=False)
]


class _ManifestDumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the spec inside a ConfigMap reads as JSON, not escapes."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def dump_manifests(manifests: list[dict[str, object]]) -> str:
    return yaml.dump_all(manifests, Dumper=_ManifestDumper, sort_keys=False, width=1_000_000)


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        elif path.exists():
            files.append(path)
        else:
            err.print(f"[red]error:[/] {path}: no such file or folder")
            raise typer.Exit(2)
    return files


def load_job(path: Path) -> FineTuneJob:
    """The one FineTuneJob of a file, or exit with every error named by field."""
    results = validate_file(path)
    jobs = [r for r in results if r.errors] or results
    if len(results) != 1:
        err.print(f"[red]error:[/] {path}: expected exactly one FineTuneJob, found {len(results)}")
        raise typer.Exit(2)
    if jobs[0].errors:
        _print_errors(jobs[0])
        raise typer.Exit(1)
    with path.open(encoding="utf-8") as stream:
        document = next(d for d in yaml.safe_load_all(stream) if d)
    job, _ = validate_manifest(document)
    assert job is not None
    return job


def _print_errors(result: DocumentResult) -> None:
    err.print(f"[red]✗[/] {result.source} ({result.name}): {len(result.errors)} error(s)")
    for error in result.errors:
        err.print(f"    {error}", markup=False, highlight=False)


@app.command()
def crd() -> None:
    """Print the FineTuneJob CustomResourceDefinition (generated from the API models)."""
    sys.stdout.write(crd_yaml())


@app.command()
def reference() -> None:
    """Print the field reference (docs/reference.md) generated from the API models."""
    sys.stdout.write(reference_markdown())


@app.command()
def validate(filename: FilesOption) -> None:
    """Check FineTuneJob manifests; every error names its field and what would be valid."""
    results = [r for path in _expand(filename) for r in validate_file(path)]
    failed = [r for r in results if r.errors]
    for result in results:
        if result.errors:
            _print_errors(result)
        else:
            out.print(f"[green]✓[/] {result.source} ({result.name})")
    if not results:
        err.print("[yellow]no FineTuneJob found[/]")
        raise typer.Exit(1)
    if failed:
        raise typer.Exit(1)


@app.command()
def render(
    filename: FileOption,
    image: Annotated[str, typer.Option(help="Default trainer image.")] = RenderConfig.trainer_image,
) -> None:
    """Print the ConfigMap and PyTorchJob the operator would create for a FineTuneJob."""
    job = load_job(filename)
    manifests = build_all(job, RenderConfig(trainer_image=image))
    sys.stdout.write(dump_manifests(manifests))


@app.command()
def operator(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")] = False,
    json_logs: Annotated[bool, typer.Option("--json-logs/--text-logs", help="Log format.")] = True,
) -> None:
    """Run the operator against the current kubeconfig (in a pod: its ServiceAccount) until stopped.

    Configured from KUBETUNE_* environment variables: NAMESPACES, TRAINER_IMAGE, METRICS_PORT,
    HEALTH_PORT, PROGRESS_INTERVAL_SECONDS.
    """
    from kubetune.controller.main import run_operator

    run_operator(verbose=verbose, json_logs=json_logs)


def _trainer_available() -> bool:
    try:
        import importlib.util

        return (
            importlib.util.find_spec("kubetune_trainer") is not None
            and importlib.util.find_spec("torch") is not None
        )
    except ModuleNotFoundError:
        return False


def _require_trainer() -> None:
    if not _trainer_available():
        err.print("[red]error:[/] this verb needs the trainer: pip install 'kubetune[trainer]'")
        raise typer.Exit(2)


@app.command()
def estimate(
    filename: FileOption,
    output_format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Trainable parameters and per-GPU memory of a job, from the model's config alone (no weights)."""
    load_job(filename)
    _require_trainer()
    command = [
        sys.executable,
        "-m",
        "kubetune_trainer.estimate",
        "-f",
        str(filename),
        "--format",
        output_format,
    ]
    raise typer.Exit(subprocess.call(command))


def _print_summary(summary: dict[str, object]) -> None:
    from rich.table import Table

    def number(key: str, spec: str) -> str:
        value = summary.get(key)
        return format(value, spec) if isinstance(value, int | float) else "-"

    table = Table(title="kubetune run: summary", show_header=False)
    table.add_row(
        "trainable parameters",
        f"{number('trainableParams', ',')} of {number('totalParams', ',')} ({number('trainableShare', '.2%')})",
    )
    table.add_row("optimizer steps", number("steps", "d"))
    table.add_row("training loss", f"{number('lossFirst', '.4f')} -> {number('lossLast', '.4f')}")
    table.add_row("eval loss", number("evalLoss", ".4f"))
    table.add_row("tokens / s", number("tokensPerSecond", ",.0f"))
    table.add_row("adapter", str(summary.get("adapterUri", "-")))
    table.add_row("sha256 of manifest", str(summary.get("adapterSha256", "-")))
    table.add_row("loss curve", str(summary.get("lossPlot", "-")))
    out.print(table)


def _print_samples(summary: dict[str, object]) -> None:
    """The sample prompts beside the base model's and the trained model's answers, and the scores.

    Answers are shown whole, each line break as ⏎ (a base model's layout is part of what it does);
    a tuned answer that misses says what was expected."""
    from rich.markup import escape
    from rich.table import Table

    samples = summary.get("samples")
    if not isinstance(samples, list) or not samples:
        return
    table = Table(title="kubetune run: sample answers (greedy)", show_lines=True)
    table.add_column("prompt", ratio=3)
    table.add_column("base model", ratio=2)
    table.add_column("tuned", ratio=2)
    marks = {True: "[green]✓[/] ", False: "[red]✗[/] "}

    def answer(sample: dict[str, object], key: str, exact_key: str) -> str:
        exact = sample.get(exact_key)
        text = escape(str(sample.get(key, "-")).replace("\n", "⏎"))
        return (marks[exact] if isinstance(exact, bool) else "") + text

    for sample in samples:
        tuned = answer(sample, "answer", "exactMatch")
        if sample.get("exactMatch") is False:
            tuned += f"\n[dim](expected {escape(str(sample.get('expected')))})[/]"
        table.add_row(escape(str(sample["prompt"])), answer(sample, "baseAnswer", "baseExactMatch"), tuned)
    out.print(table)
    exact, base = summary.get("exactMatch"), summary.get("baseExactMatch")
    if isinstance(exact, int | float):
        count = sum(1 for s in samples if "expected" in s)
        before = f"{base:.0%}" if isinstance(base, int | float) else "-"
        out.print(f"exact match on {count} held-out prompts: base model {before} -> tuned {exact:.0%}")


def local_env(
    job: FineTuneJob, workdir: Path, report_dir: Path, pvc_root: Path, base: Mapping[str, str]
) -> dict[str, str]:
    """The trainer's environment in local mode: what the pod would get, with this machine's folders.
    `pvc://CLAIM/path` is read from (and written to) `pvc_root/CLAIM/path`."""
    return {
        **base,
        "KUBETUNE_SPEC": str(workdir / "spec.json"),
        "KUBETUNE_JOB_NAME": job.name,
        "KUBETUNE_NAMESPACE": job.namespace,
        "KUBETUNE_LOCAL": "1",
        "KUBETUNE_TERMINATION_LOG": str(workdir / "termination-log"),
        "TMPDIR": base.get("TMPDIR", str(workdir)),
        "KUBETUNE_REPORT_DIR": str(report_dir),
        # A busy machine deschedules one of torch's OpenMP threads while the other spins waiting for it:
        # on 2 shared cores a forward pass took 3-6x and a generated token 20-30x as long as with
        # waiting threads that sleep instead.
        "OMP_WAIT_POLICY": base.get("OMP_WAIT_POLICY", "PASSIVE"),
        PVC_ROOT_ENV: str(pvc_root.absolute()),
    }


@app.command()
def run(
    filename: FileOption,
    nproc: Annotated[int, typer.Option("--nproc", help="Training processes on this machine.", min=1)] = 1,
    pvc_root: Annotated[
        Path,
        typer.Option(
            "--pvc-root",
            envvar=PVC_ROOT_ENV,
            help="The folder that stands for the cluster's claims: pvc://CLAIM/path is DIR/CLAIM/path.",
        ),
    ] = Path("pvc"),
) -> None:
    """Run a FineTuneJob on this machine through torchrun, with the spec the operator would render."""
    job = load_job(filename)
    _require_trainer()
    workdir = Path(tempfile.mkdtemp(prefix=f"kubetune-{job.name}-"))
    report_dir = Path("out") / "reports" / job.name
    (workdir / "spec.json").write_text(spec_document(job), encoding="utf-8")
    env = local_env(job, workdir, report_dir, pvc_root, os.environ)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "kubetune_trainer"]
    out.print(f"[bold]kubetune[/] running {job.name} ({job.spec.method.type.value}) with {nproc} process(es)")
    code = subprocess.call(command, env=env)
    if code == 0 and (report_dir / "summary.json").exists():
        summary = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
        _print_samples(summary)
        _print_summary(summary)
    if code != 0:
        reason_file = workdir / "termination-log"
        reason = reason_file.read_text(encoding="utf-8").strip() if reason_file.exists() else ""
        err.print(f"[red]✗ training failed[/] (exit {code}){': ' + reason if reason else ''}")
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
