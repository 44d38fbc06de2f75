"""The pure parts of `make bench`: percentiles, how the operator benchmark reads the audit log and a profile,
and docs/benchmarks.md rendered from results on disk (tests/data/bench holds a small operator_scale run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from bench.common import markdown_table, percentile, summarize
from bench.operator_scale import (
    BENCH_USER,
    OPERATOR_USER,
    PEER_USER,
    Request,
    Window,
    apiserver_categories,
    attribute_writes,
    created_in_audit,
    hop_segments,
    owning_job,
    patched_fields,
    peer_writes,
    slow_watchers_closed,
    summarize_profile,
    watch_cache_backlog,
)
from bench.report import anchor, build_report

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "bench" / "operator_scale.json"


# ------------------------------------------------------------------------------------------- percentiles


def test_percentiles_interpolate_between_ranks_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def test_a_percentile_of_nothing_or_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_a_summary_says_how_many_and_leaves_an_empty_sample_blank() -> None:
    summary = summarize([0.1, 0.2, 0.3, 10.0])
    assert summary["count"] == 4
    assert summary["max"] == 10.0
    assert summary["p50"] == 0.25
    assert summarize([]) == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}


def test_markdown_tables_escape_pipes_and_show_missing_values_as_dashes() -> None:
    table = markdown_table(["a", "b"], [["x|y", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | — |"]


# ------------------------------------------------------------------------------------------ audit log


def request(at: float, verb: str, resource: str, name: str, **kwargs: Any) -> Request:
    return Request(
        at=at,
        done=kwargs.get("done", at),
        user=kwargs.get("user", OPERATOR_USER),
        verb=verb,
        resource=resource,
        subresource=kwargs.get("subresource", ""),
        name=name,
        code=kwargs.get("code", 200),
        body=kwargs.get("body", {}),
    )


def test_each_request_is_put_down_to_the_job_it_was_about() -> None:
    jobs = {"ft-00001", "ft-00002"}
    assert owning_job(request(0, "create", "configmaps", "ft-00001-spec"), jobs) == "ft-00001"
    assert owning_job(request(0, "create", "pods", "ft-00002-master-0"), jobs) == "ft-00002"
    event = request(0, "create", "events", "", body={"involvedObject": {"name": "ft-00002"}})
    assert owning_job(event, jobs) == "ft-00002"
    assert owning_job(request(0, "create", "events", "ft-00001-master-0.18a2b"), jobs) == "ft-00001"
    assert owning_job(request(0, "get", "nodes", "kwok-gpu-node-0"), jobs) is None


def test_a_patch_is_described_by_the_fields_it_touches() -> None:
    json_patch = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
        {"op": "add", "path": "/metadata/finalizers", "value": ["kubetune.io/finalizer"]},
    ]
    assert patched_fields(json_patch) == ["/metadata/finalizers"]
    assert patched_fields({"metadata": {"resourceVersion": "7", "annotations": {}}, "spec": {}}) == [
        "/metadata/annotations",
        "/spec",
    ]
    assert (
        request(0, "patch", "finetunejobs", "j", body=json_patch).kind
        == "patch finetunejobs [/metadata/finalizers]"
    )
    lost = {"status": {"conditions": [{"type": "Running", "status": "False", "reason": "NodeLost"}]}}
    assert request(0, "patch", "finetunejobs", "j", subresource="status", body=lost).kind == (
        "patch finetunejobs/status (to NodeLost)"
    )
    running = {"status": {"conditions": [{"type": "Running", "status": "True", "reason": "Running"}]}}
    assert request(0, "patch", "finetunejobs", "j", subresource="status", body=running).kind == (
        "patch finetunejobs/status"
    )


def test_writes_split_at_the_patch_that_makes_the_job_running() -> None:
    """Before the Running patch: create; from it until the steady window: status change; then resync, restart."""
    running = {"status": {"phase": "Running"}}
    requests = [
        request(1, "patch", "finetunejobs", "a", body=[{"op": "add", "path": "/metadata/finalizers"}]),
        request(2, "create", "configmaps", "a-spec", code=201),
        request(3, "create", "pytorchjobs", "a", code=201),
        request(4, "patch", "finetunejobs", "a", subresource="status", code=409, body=running),
        request(5, "patch", "finetunejobs", "a", subresource="status", body={"status": {"phase": "Pending"}}),
        request(6, "patch", "finetunejobs", "a", subresource="status", body=running),
        request(7, "create", "events", "", code=201, body={"involvedObject": {"name": "a"}}),
        request(11, "patch", "finetunejobs", "a", subresource="status", body=running),
        request(21, "create", "pytorchjobs", "a", code=409),
        request(3, "get", "pytorchjobs", "a"),  # reads are not writes
        request(3, "create", "pods", "a-master-0", user=PEER_USER, code=201),  # nor the peer's writes ours
    ]
    writes = attribute_writes(requests, ["a"], steady=Window(10, 20), restart=Window(20, 30))
    assert writes["create"]["perJob"] == 5, "a refused Running patch does not end the create phase"
    assert writes["create"]["refusedPerJob"] == 1
    assert writes["statusChange"]["byKind"] == {"patch finetunejobs/status": 1, "create events": 1}
    assert writes["resync"]["perJob"] == 1
    assert writes["restart"] == {
        "perJob": 1,
        "refusedPerJob": 1,
        "total": 1,
        "byKind": {"create pytorchjobs": 1},
    }
    assert peer_writes(requests, ["a"], Window(0, 10))["perJob"] == 1


def test_hops_are_timed_between_the_completions_of_the_creates_the_api_server_accepted() -> None:
    requests = [
        request(1.0, "create", "finetunejobs", "a", user=BENCH_USER, code=201, done=1.1),
        request(1.2, "create", "configmaps", "a-spec", code=201, done=1.3),
        request(1.3, "create", "pytorchjobs", "a", code=201, done=1.6),
        request(2.0, "create", "pytorchjobs", "a", code=409, done=2.1),  # a retry refused: not a creation
        request(1.7, "create", "pods", "a-worker-0", user=PEER_USER, code=201, done=1.9),
        request(1.7, "create", "pods", "a-master-0", user=PEER_USER, code=201, done=1.8),
        request(1.8, "patch", "pytorchjobs", "a", subresource="status", user=PEER_USER, done=1.85),
        # b never got further
        request(1.0, "create", "finetunejobs", "b", user=BENCH_USER, code=201, done=1.2),
        request(1.0, "create", "pytorchjobs", "someone-elses", code=201, done=1.4),
    ]
    created = created_in_audit(requests, ["a", "b"])
    assert created.intervals("ftj_created", "ptj_created", ["a", "b"]) == pytest.approx([0.5])
    first_pod = created.intervals("ptj_created", "pod_created", ["a", "b"])
    assert first_pod == pytest.approx([0.2])
    assert created.count("ftj_created") == 2


def test_our_hop_is_cut_at_the_operators_two_creates_into_segments_that_add_up_to_it() -> None:
    requests = [
        request(1.0, "create", "finetunejobs", "a", user=BENCH_USER, code=201, done=1.1),
        request(1.2, "create", "configmaps", "a-spec", code=201, done=1.3),
        request(1.35, "create", "pytorchjobs", "a", code=201, done=1.6),
        request(1.0, "create", "finetunejobs", "b", user=BENCH_USER, code=201, done=1.1),
        request(1.5, "create", "configmaps", "b-spec", code=201, done=1.7),  # b's PyTorchJob never came
    ]
    created = created_in_audit(requests, ["a", "b"])
    segments = hop_segments(requests, ["a", "b"], created)
    assert segments == {
        "toFirstWrite": pytest.approx([0.1]),
        "configMapCreate": pytest.approx([0.1]),
        "betweenWrites": pytest.approx([0.05]),
        "pyTorchJobCreate": pytest.approx([0.25]),
    }
    hop = created.intervals("ftj_created", "ptj_created", ["a"])
    assert sum(values[0] for values in segments.values()) == pytest.approx(hop[0])


def test_a_profile_is_summed_by_category_and_by_our_functions(tmp_path: Path) -> None:
    stacks = tmp_path / "raw.txt"
    stacks.write_text(
        "main (kubetune/cli.py:1);refresh_status (/x/operator/kubetune/controller/kube.py:290);"
        "model_validate (/x/site-packages/pydantic/main.py:10) 3\n"
        "main (kubetune/cli.py:1);refresh_status (/x/operator/kubetune/controller/kube.py:291);"
        "loads (/usr/lib/python3.11/json/__init__.py:5) 1\n"
    )
    profile = summarize_profile(stacks)
    assert profile["samples"] == 4
    assert profile["categories"][0] == ["pydantic validation", 75.0]
    assert ["refresh_status (kubetune/controller/kube.py)", 100.0] in profile["ourFunctionsInclusive"]
    assert not any("cli.py" in name for name, _ in profile["ourFunctionsInclusive"]), (
        "entry points say nothing"
    )


def _trace(value: str, *frames: str) -> str:
    """One sample stack as `go tool pprof -traces` prints it: the leaf first, with the time it holds."""
    head, *rest = frames
    return (
        f"-----------+-------------------------------------------------------\n{value:>10}   {head}\n"
        + "".join(f"             {frame}\n" for frame in rest)
    )


def test_the_api_servers_profile_is_split_by_kind_of_work_counting_each_sample_once() -> None:
    status_patch = (
        "github.com/google/cel-go/interpreter.(*evalEq).Eval",
        "k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel.(*Validator).Validate",
        "k8s.io/apiextensions-apiserver/pkg/registry/customresource.(*StatusREST).Update",
        "k8s.io/apiserver/pkg/endpoints/handlers.(*patcher).patchResource.func2",
        "k8s.io/apiserver/pkg/endpoints/handlers/finisher.finishRequest.func1",
    )
    create = (
        "encoding/json.Marshal",
        "k8s.io/apiserver/pkg/registry/generic/registry.(*Store).Create",
        "k8s.io/apiextensions-apiserver/pkg/apiserver.(*crdHandler).serveResource.CreateResource.createHandler.func9",
    )
    traces = (
        "File: kube-apiserver\nType: cpu\nDuration: 30s, Total samples = 1.60s (5.33%)\n"
        + _trace("1s", *status_patch)
        + _trace("300ms", *create)
        + _trace("200ms", "runtime.scanObject", "runtime.gcDrain", "runtime.gcBgMarkWorker")
        + _trace("100ms", "runtime.futex", "runtime.mcall")
        + "-----------+-------------------------------------------------------\n"
    )
    profile = apiserver_categories(traces)
    assert profile["cpuSeconds"] == 1.6
    assert profile["categories"] == [
        ["status PATCHes of FineTuneJobs (only the operator sends them)", 1.0, 62.5],
        ["creates (all clients)", 0.3, 18.8],
        ["Go's garbage collector (background)", 0.2, 12.5],
        ["other", 0.1, 6.2],
    ]
    assert profile["celPercent"] == 62.5, "CEL is counted across the rows, within the writes"


def test_the_report_prices_the_operators_status_patches_in_the_api_servers_cpu(tmp_path: Path) -> None:
    results = json.loads(FIXTURE.read_text())
    results["profile"] = {
        "jobs": 300,
        "apiServerWave": {
            "seconds": 20.0,
            "cpuSeconds": 30.0,
            "celPercent": 9.0,
            "operatorStatusPatches": 300,
            "categories": [
                ["status PATCHes of FineTuneJobs (only the operator sends them)", 6.0, 20.0],
                ["creates (all clients)", 9.0, 30.0],
                ["other", 15.0, 50.0],
            ],
        },
    }
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    page = build_report(tmp_path)
    finding = next(line for line in page.splitlines() if "**The API server's CPU**" in line)
    assert "over 20 s, 1.50 cores" in finding
    assert "The operator's 300 status patches in that window cost it 20.0 ms of CPU each" in finding
    assert "| creates (all clients) | 9.0 | 30.0 |" in page


# --------------------------------------------------------------------------------------------- report


def test_the_report_renders_the_operator_section_and_names_what_was_not_measured(tmp_path: Path) -> None:
    shutil.copy(FIXTURE, tmp_path / "operator_scale.json")
    page = build_report(tmp_path)
    assert page.startswith("# Benchmarks\n")
    assert "## Operator at fleet scale" in page
    assert "(#operator-at-fleet-scale)" in page, "the machine table links to the section"
    assert "`python -m bench.operator_scale --quick`" in page
    not_measured = page.split("**Not measured**", 1)[1].split("## ", 1)[0]
    assert "bench.trainer_throughput" in not_measured and "bench.gpu_throughput" in not_measured
    assert "bench.operator_scale" not in not_measured
    results = json.loads(FIXTURE.read_text())
    hop_p99 = results["scales"][-1]["operator"]["latency"]["createToPyTorchJob"]["p99"]
    target_row = next(line for line in page.splitlines() if line.startswith("| our hop p99 at"))
    assert f"{hop_p99:.3g} s" in target_row
    assert ("**missed**" in target_row) == (hop_p99 > 0.5)
    assert "### What limits it" in page


def test_the_report_bounds_the_hop_by_the_write_latency_it_measured(tmp_path: Path) -> None:
    """Two writes in a row at the measured create latency, and what the workers can start at that latency."""
    results = json.loads(FIXTURE.read_text())
    results["settings"]["operatorWorkers"] = 30
    largest = results["scales"][-1]
    largest["operator"]["latency"]["createCall"] = summarize([0.5] * 10)
    largest["floor"]["latency"]["createCall"] = summarize([0.1] * 10)
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    page = build_report(tmp_path)
    finding = next(line for line in page.splitlines() if "write latency" in line)
    assert "p50 0.5 s" in finding and "p50 0.1 s" in finding
    assert "about 1 s at the median latency" in finding, "two writes of 0.5 s"
    assert "at most 30 jobs/s" in finding, "30 workers, two writes of 0.5 s per job before any status"


def test_sections_come_in_a_fixed_order_whatever_the_files(tmp_path: Path) -> None:
    for name in ("gpu_throughput", "operator_scale"):
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"machine": {"command": f"python -m bench.{name}"}})
        )

    def stub(name: str) -> Any:
        if name == "gpu_throughput":
            return None  # results present, but no renderer
        return lambda results: f"## Section {name}\n\nrendered"

    page = build_report(tmp_path, renderers=stub)
    assert page.index("## Section operator_scale") < page.index("## Trainer throughput on a GPU")
    assert "has no `render_markdown`" in page
    assert "bench.trainer_throughput" in page.split("**Not measured**", 1)[1]


def test_anchors_follow_github() -> None:
    assert anchor("Operator at fleet scale") == "operator-at-fleet-scale"
    assert anchor("Trainer throughput (CPU)") == "trainer-throughput-cpu"


def test_the_latency_table_shows_the_hop_as_the_watches_saw_it_beside_the_audit(tmp_path: Path) -> None:
    results = json.loads(FIXTURE.read_text())
    latency = results["scales"][-1]["operator"]["latency"]
    latency["watched"] = {"createToPyTorchJob": summarize([7.25] * 10)}
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    rows = [
        line for line in build_report(tmp_path).splitlines() if "as the benchmark's watches saw it" in line
    ]
    assert len(rows) == 1 and "7.25 s" in rows[0], "only where the results hold it"


def test_the_report_says_where_the_hop_goes_when_the_results_hold_its_segments(tmp_path: Path) -> None:
    results = json.loads(FIXTURE.read_text())
    results["scales"][-1]["operator"]["hopSegments"] = {
        "toFirstWrite": summarize([1.0] * 4),
        "configMapCreate": summarize([0.5] * 4),
        "betweenWrites": summarize([0.1] * 4),
        "pyTorchJobCreate": summarize([0.4] * 4),
    }
    results["settings"]["operatorWorkers"] = 10
    largest = results["scales"][-1]
    largest["jobs"], largest["operator"]["submitSeconds"] = 100, 10.0
    largest["operator"]["writes"]["create"]["perJob"] = 3.0
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    page = build_report(tmp_path)
    finding = next(line for line in page.splitlines() if "**Where the hop goes**" in line)
    assert "of 2 s, 0.9 s (45%) is the API server" in finding
    assert "1 s (50%) passes before its first write" in finding
    assert "histogram" not in finding, "said only where the results hold the operator's queue wait"
    largest["operator"]["queueWait"] = {"first": {"count": 100, "meanSeconds": 0.75}}
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    finding = next(line for line in build_report(tmp_path).splitlines() if "**Where the hop goes**" in line)
    assert "new jobs waited 0.75 s for a worker on average" in finding
    assert "the rest, about 0.25 s, is the FineTuneJob's watch event reaching the operator" in finding
    largest["operator"]["latency"]["toIdleWatcher"] = summarize([0.1] * 3 + [0.3])
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    page_with_probe = build_report(tmp_path)
    finding = next(line for line in page_with_probe.splitlines() if "**Where the hop goes**" in line)
    assert "received the FineTuneJobs 0.15 s after they were created on average, 8% of the hop" in finding
    assert "The rest, about 0.1 s, is the operator receiving the event later than that" in finding
    largest["operator"]["watchCacheBacklog"] = {"finetunejobs.kubetune.io": 28, "pods": 6}
    largest["operator"]["slowWatchersClosed"] = {
        "/kubetune.io/finetunejobs/": 2,
        "/kubetune.io/finetunejobs/bench/ [kubetune.io/bench=operator-scale]": 1,
        "/kubetune.io/finetunejobs/bench/": 29,
    }
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    finding = next(line for line in build_report(tmp_path).splitlines() if "**Where the hop goes**" in line)
    assert (
        "(the API server closed the operator's FineTuneJob watch 2 time(s) and the idle watcher's 1 time(s) "
        "for falling behind)." in finding
    )
    assert (
        "its FineTuneJob watch cache held up to 28 events received from etcd and not yet dispatched"
        in finding
    )
    assert "| FineTuneJob created → its watch event at an idle watcher | 0.1 s |" in page_with_probe
    largest["operator"]["submitCores"] = {"kube-apiserver": 1.1, "etcd": 0.5, "kubetune operator": 0.3}
    results["machine"]["cores"] = 2
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    cores = next(line for line in build_report(tmp_path).splitlines() if "**The machine's cores" in line)
    assert "kube-apiserver 1.10, etcd 0.50, kubetune operator 0.30; 1.90 in all of the 2 there are." in cores
    busy = next(line for line in page.splitlines() if "**The workers are busy writing" in line)
    # 10 jobs/s x 3 writes x 0.5 s per write (the two creates and the gap, 1 s, halved) over 10 workers
    assert "holds a worker about 0.5 s" in busy and "at least 150% busy" in busy
    assert "| the API server creates the ConfigMap | 0.5 s | 0.5 s | 0.5 s | 25% |" in page


def test_the_api_servers_log_tells_whose_watch_was_closed_and_how_far_its_watch_caches_fell_behind(
    tmp_path: Path,
) -> None:
    log = tmp_path / "kube-apiserver.log"
    log.write_text(
        "I1203 15:29:34.885437 5986 cacher.go:881] cacher (finetunejobs.kubetune.io): 3 objects queued in incoming channel.\n"
        "I1203 15:29:35.885437 5986 cacher.go:881] cacher (finetunejobs.kubetune.io): 28 objects queued in incoming channel.\n"
        "I1203 15:29:35.985437 5986 cacher.go:881] cacher (pods): 6 objects queued in incoming channel.\n"
        "I1203 15:29:36.1 5986 cache_watcher.go:203] Forcing finetunejobs.kubetune.io watcher close due to "
        'unresponsiveness (reason = unresponsive): key: "/kubetune.io/finetunejobs/bench/", labels: '
        '"kubetune.io/bench=operator-scale", fields: "". len(c.input) = 10, len(c.result) = 10, graceful = false\n'
        "I1203 15:29:36.2 5986 cache_watcher.go:203] Forcing finetunejobs.kubetune.io watcher close due to "
        'unresponsiveness: key: "/kubetune.io/finetunejobs/", labels: "", fields: "". len(c.input) = 10\n'
    )
    lines = log.read_text().splitlines()
    assert watch_cache_backlog(lines) == {"finetunejobs.kubetune.io": 28, "pods": 6}
    assert slow_watchers_closed(lines) == {
        "/kubetune.io/finetunejobs/bench/ [kubetune.io/bench=operator-scale]": 1,
        "/kubetune.io/finetunejobs/": 1,
    }


def test_the_restart_is_the_best_of_several_as_the_raw_list_is(tmp_path: Path) -> None:
    results = json.loads(FIXTURE.read_text())
    restart = results["scales"][-1]["operator"]["restart"]
    restart["each"] = [{"settleSeconds": s, "cpuSeconds": 1.0, "peakRssMiB": 150.0} for s in (3.5, 2.5, 3.0)]
    restart["settleSeconds"] = 2.5
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    said = next(line for line in build_report(tmp_path).splitlines() if "**Restart**" in line)
    assert "2.5 s from the process start" in said
    assert "the best of 3 restarts (3.5 s, 2.5 s, 3 s)" in said
    assert "writes per job over the 3 restarts" in said


def test_a_restart_that_misses_its_target_is_told_what_the_new_process_spent_before_its_first_request(
    tmp_path: Path,
) -> None:
    results = json.loads(FIXTURE.read_text())
    restart = results["scales"][-1]["operator"]["restart"]
    restart.update(
        settleSeconds=2.5, settleAfterFirstRequestSeconds=1.4, rawListSeconds=1.0, ratioToRawList=2.5
    )
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    said = next(line for line in build_report(tmp_path).splitlines() if "**Restart**" in line)
    assert "1.1 s (Python starting and importing the operator) passed before its first request" in said
    assert "from its first request the restart took 1.4x the raw list" in said

    restart.update(settleSeconds=1.9, ratioToRawList=1.9)
    (tmp_path / "operator_scale.json").write_text(json.dumps(results))
    said = next(line for line in build_report(tmp_path).splitlines() if "**Restart**" in line)
    assert "before its first request" not in said, "within the target, nothing to explain"
