"""Load tests end to end: `tokenmill loadtest` (Locust headless, a subprocess) against a real gateway + worker on the
embedded model; the report's counts against the per-request CSV, Locust's CSVs and the gateway's own counters."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import ROOT, free_port

STATUS_NAMES = {c.name for c in grpc.StatusCode} | {"INCOMPLETE"}


@pytest.fixture(scope="module")
def worker(cluster):
    # Room for 4 sequences; one torch thread (this machine has 2 cores and other work on them).
    return cluster.start("worker", "--engine", "hf-static", "--max-batch-size", "4", "--max-num-seqs", "4",
                         "--threads", "1")


def run_loadtest(entry: list[str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *entry, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def gateway_counts(http: str) -> Counter:
    """The gateway's own count of requests by final status (Prometheus counter)."""
    counts: Counter = Counter()
    for line in httpx.get(http + "/metrics").text.splitlines():
        if line.startswith("tokenmill:gateway_requests_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def check_run(out: Path) -> tuple[dict, list[dict]]:
    """What every run must satisfy: report == per-request CSV == Locust's CSVs, failures named, plots drawn."""
    summary = json.loads((out / "summary.json").read_text())
    rows = read_csv(out / "locust_requests.csv")
    assert rows, "no request recorded"
    by_status = Counter(r["status"] for r in rows)

    # the report's counts are the CSV's
    assert summary["requests"] == len(rows)
    assert summary["ok"] == by_status["OK"] and summary["failed"] == len(rows) - by_status["OK"]
    assert summary["by_status"] == dict(by_status)
    assert summary["success_rate"] == pytest.approx(by_status["OK"] / len(rows), abs=1e-4)
    assert summary["requests_per_hour"] == pytest.approx(by_status["OK"] / summary["duration_s"] * 3600, rel=0.01)

    # ... and Locust's own: every end-to-end entry, every TTFT entry, every failure by name
    stats = {(r["Type"], r["Name"]): r for r in read_csv(out / "locust_stats.csv") if r["Name"] != "Aggregated"}
    kinds = Counter((r["protocol"], r["kind"]) for r in rows)
    for key, n in kinds.items():
        assert int(stats[key]["Request Count"]) == n, key
        failed = sum(1 for r in rows if (r["protocol"], r["kind"]) == key and r["status"] != "OK")
        assert int(stats[key]["Failure Count"]) == failed, key
    ttft = Counter((r["protocol"], r["kind"] + " TTFT") for r in rows if r["client_ttft_ms"])
    assert {k: int(v["Request Count"]) for k, v in stats.items() if k[1].endswith(" TTFT")} == dict(ttft)
    assert set(stats) == set(kinds) | set(ttft)
    assert summary["locust_agrees"] and summary["failure_names_agree"]
    run = json.loads((out / "locust_run.json").read_text())
    assert run["requests_recorded"] == len(rows)
    assert run["requests_abandoned"] == summary["abandoned_in_flight"] == 0  # --stop-timeout: all finished

    # every failure is classified by its status, in the CSV and in Locust's failure table
    for r in rows:
        assert r["status"] in STATUS_NAMES, r
        if r["status"] == "OK":
            assert int(r["completion_tokens"]) > 0 and float(r["latency_ms"]) > 0, r
            assert r["worker"] or r["protocol"] == "http", r  # the OpenAI API does not say which worker
            assert float(r["tokens_per_s"]) > 0, r
            if r["protocol"] == "grpc" or r["kind"] == "GenerateStream":  # a unary HTTP reply has no TTFT
                assert 0 < float(r["ttft_ms"]) <= float(r["latency_ms"]) + 1, r
        else:
            assert r["error"], r
    failures = read_csv(out / "locust_failures.csv")
    assert {f["Error"] for f in failures} <= STATUS_NAMES - {"OK"}
    assert sum(int(f["Occurrences"]) for f in failures) == summary["failed"]

    # the report a person reads, and its plots
    md = (out / "report.md").read_text()
    for text in ("requests/hour", "success rate", "p50", "p90", "p95", "p99", "TTFT", "output tokens/s",
                 "all counts agree"):
        assert text in md, text
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    import matplotlib.image

    for name in ("throughput.png", "latency_over_time.png", "latency_distribution.png"):
        path = out / name
        assert path.stat().st_size > 10_000, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.01, name
    assert (out / "locust.html").stat().st_size > 0 and (out / "locust_stats_history.csv").stat().st_size > 0
    return summary, rows


def test_loadtest_report_agrees_with_csv_and_gateway(cluster, worker, tmp_path):
    http_port = free_port()
    gw = cluster.gateway([worker], "--http-port", str(http_port))
    http = f"http://127.0.0.1:{http_port}"
    out = tmp_path / "new" / "folder"  # --out is created if missing
    proc = run_loadtest(["-m", "services.cli", "loadtest"], "--host", gw.address, "--users", "14", "--spawn-rate",
                        "14", "--run-time", "20s", "--max-tokens", "8", "--stream-ratio", "0.5",
                        "--stop-timeout", "60", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary, rows = check_run(out)
    assert summary["ok"] >= 4 and summary["ok"] == len(rows)  # nothing fails against a roomy gateway
    assert {r["kind"] for r in rows} == {"Generate", "GenerateStream"}
    assert summary["ttft_ms"]["p50"] is not None and summary["latency_ms"]["p99"] is not None
    assert summary["output_tokens_per_s"] > 0 and summary["workers"] == {worker.address: len(rows)}
    # the client measures the server, not itself: with more users than gevent's default threadpool (10), gRPC
    # replies used to arrive seconds after the gateway sent them
    assert summary["client_overhead_ms"]["p95"] < 300, summary["client_overhead_ms"]
    # no request missing: the gateway answered exactly the requests the CSV holds (no in-flight one was
    # abandoned at the end: --stop-timeout lets them finish)
    assert gateway_counts(http) == Counter({"OK": len(rows)})
    assert "report.md" in proc.stdout and "requests/hour" in proc.stdout

    # the same test over the OpenAI-compatible HTTP front
    out_http = tmp_path / "http"
    proc = run_loadtest(["-m", "loadtest"], "--http", "--host", http, "--users", "3", "--spawn-rate", "3",
                        "--run-time", "8s", "--max-tokens", "8", "--stop-timeout", "60", "--out", str(out_http))
    assert proc.returncode == 0, proc.stderr
    summary_http, rows_http = check_run(out_http)
    assert summary_http["ok"] == len(rows_http) > 0 and {r["protocol"] for r in rows_http} == {"http"}
    assert gateway_counts(http)["OK"] == len(rows) + len(rows_http)


def test_tiny_queue_shows_resource_exhausted_by_name(cluster, worker, tmp_path):
    http_port = free_port()
    gw = cluster.gateway([worker], "--max-queued-requests", "1", "--http-port", str(http_port))
    out = tmp_path / "tiny"
    proc = run_loadtest(["-m", "loadtest"], "--host", gw.address, "--users", "8", "--spawn-rate", "8",
                        "--run-time", "12s", "--max-tokens", "8", "--wait-min", "0.1", "--wait-max", "0.3",
                        "--stop-timeout", "60", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary, rows = check_run(out)
    counts = Counter(r["status"] for r in rows)
    assert counts["RESOURCE_EXHAUSTED"] > 0 and counts["OK"] > 0, counts
    assert set(counts) == {"OK", "RESOURCE_EXHAUSTED"}, counts
    assert summary["failures"]["RESOURCE_EXHAUSTED"]["count"] == counts["RESOURCE_EXHAUSTED"]
    assert "queue is full" in summary["failures"]["RESOURCE_EXHAUSTED"]["example"]
    failures = read_csv(out / "locust_failures.csv")
    assert {f["Error"] for f in failures} == {"RESOURCE_EXHAUSTED"}
    assert "| RESOURCE_EXHAUSTED |" in (out / "report.md").read_text()
    assert gateway_counts(f"http://127.0.0.1:{http_port}") == counts


def test_cli_interface():
    """`tokenmill loadtest` is registered and takes the Kubernetes Job's arguments."""
    from typer.testing import CliRunner

    from loadtest.cli import locust_command
    from services.cli import app

    result = CliRunner().invoke(app, ["loadtest", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in ("--host", "--users", "--spawn-rate", "--run-time", "--out", "--up", "--http", "--max-tokens",
                 "--temperature", "--stream-ratio"):
        assert flag in result.output, flag
    # the Kubernetes Job's own arguments parse (k8s/jobs/base/loadtest.yaml and the cpu overlay's)
    import typer
    import yaml

    command = typer.main.get_command(app).commands["loadtest"]
    job = yaml.safe_load((ROOT / "k8s/jobs/base/loadtest.yaml").read_text())
    args = job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert args[0] == "loadtest"
    params = command.make_context("loadtest", [a.replace("$(RESULTS_DIR)", "/r") for a in args[1:]]).params
    assert (params["host"], params["users"], params["run_time"], str(params["out"])) == \
        ("tokenmill-gateway:50051", 64, "1h", "/r")

    cmd = locust_command(host="tokenmill-gateway:50051", users=64, spawn_rate=4, run_time="1h", out=Path("/r"),
                         user_class="GrpcUser", max_tokens=256, temperature=0.7, ignore_eos=False, stream_ratio=0.5,
                         wait_min=0, wait_max=0, request_timeout=600, prompt_seed=0, model_name="", stop_timeout=0,
                         verbose=False, extra=[])
    assert cmd[1:3] == ["-m", "locust"] and "--headless" in cmd and cmd[-1] == "GrpcUser"
    assert cmd[cmd.index("--host") + 1] == "tokenmill-gateway:50051" and cmd[cmd.index("-t") + 1] == "1h"
    assert cmd[cmd.index("--csv") + 1] == "/r/locust"
    # the CLI process itself stays free of gevent's monkey-patching (Locust runs in a subprocess)
    assert "gevent" not in sys.modules or not __import__("gevent.monkey").monkey.is_module_patched("socket")
