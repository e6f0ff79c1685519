"""Issue 27: live quality, traces, phase histograms, dashboard and alerts, checked against the real things.

One live suite for the module (real processes on 127.0.0.1, the embedded model): a paged worker and a gateway
exporting spans over OTLP/gRPC to a real OTLP trace endpoint served in this process (opentelemetry-proto's
TraceService over grpcio), a judge the gateway samples every completed request to, and Debian's Prometheus
scraping all three and evaluating k8s/monitoring's recording rules. A few requests go through it (gRPC and
HTTP, each with its own W3C traceparent); then the traces, the metrics, every dashboard query and every
recording rule are read back. The rules' alerts are unit-tested by promtool on synthetic series.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from conftest import ROOT, chat_request, free_port

from bench.observability import SpanReceiver
from services.common.metrics import sample_sum
from services.common.pb import inference_pb2_grpc

MON = ROOT / "k8s/monitoring"
DIMS = ["moral_clarity", "age_appropriateness", "narrative_coherence", "relevance"]
STORY = "Write a two-sentence story for children about a brave owl."


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: scripts/setup.sh installs Debian's prometheus package "
                    "(apt-get install prometheus), which ships it", pytrace=False)
    return path


def rules_file(path: Path, interval: str | None = None) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rule file (what promtool and prometheus read)."""
    groups = yaml.safe_load((MON / "prometheusrule.yaml").read_text())["spec"]
    if interval:
        for g in groups["groups"]:
            g["interval"] = interval
    path.write_text(yaml.safe_dump(groups))
    return path


def wait_for(what: str, check, tries: int = 240, every: float = 0.5, detail=None):
    """Poll `check` until it returns something truthy (a bounded wait, not a timing assertion)."""
    for _ in range(tries):
        got = check()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"gave up waiting for {what}" + (f": {detail()}" if detail else ""))


# what a Prometheus 2 asks for: prometheus_client's OpenMetrics answer to it would rename `tokenmill:x` samples
# `tokenmill_x` (prometheus/client_python#1177); the services answer in the text format whatever is asked
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=10).text


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    receiver = SpanReceiver()
    otlp = receiver.address
    old = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export spans every 0.2 s instead of 5 s
    ports = {k: free_port() for k in ("worker", "gateway", "judge", "http", "prometheus")}
    try:
        judge = cluster.start("judge", "--metrics-port", str(ports["judge"]), wait=False)
        worker = cluster.start("worker", "--metrics-port", str(ports["worker"]), "--otlp-traces-endpoint", otlp)
        gateway = cluster.gateway([worker], "--metrics-port", str(ports["gateway"]), "--http-port", str(ports["http"]),
                                  "--otlp-traces-endpoint", otlp, "--judge-address", judge.address,
                                  "--judge-sample-rate", "1")
    finally:
        if old is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = old
    from services.local import wait_serving

    wait_serving([judge], 240)
    work = tmp_path_factory.mktemp("prometheus")
    rules = rules_file(work / "rules.yaml", interval="1s")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{ports[name]}"]}]}
                                 for name in ("worker", "gateway", "judge")]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (work / "prometheus.log").open("w")
    prom = subprocess.Popen([tool("prometheus"), f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"receiver": receiver, "gateway": gateway.address, "worker": worker.address, "judge": judge.address,
               "ports": ports, "prometheus": f"http://127.0.0.1:{ports['prometheus']}", "prom_log": work}
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        receiver.stop()


@pytest.fixture(scope="module")
def traffic(stack):
    """Three gRPC requests (one streamed) and one HTTP request, each in a trace of the test's own."""
    traces = {}
    with grpc.insecure_channel(stack["gateway"]) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for i in range(3):
            trace_id, parent = f"{i + 1:032x}", f"{i + 1:016x}"
            metadata = [("traceparent", f"00-{trace_id}-{parent}-01")]
            req = chat_request(STORY, max_tokens=12)
            if i == 2:
                chunks = list(stub.GenerateStream(req, metadata=metadata, timeout=120))
                assert chunks[-1].finish_reason
            else:
                assert stub.Generate(req, metadata=metadata, timeout=120).text
            traces[trace_id] = parent
    trace_id, parent = "ab" * 16, "cd" * 8
    r = httpx.post(f"http://127.0.0.1:{stack['ports']['http']}/v1/chat/completions", timeout=120,
                   headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                   json={"messages": [{"role": "user", "content": STORY}], "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    traces[trace_id] = parent
    return traces


GATEWAY_SPANS = {"gateway.request", "gateway.admit", "gateway.queue", "gateway.dispatch", "gateway.stream_end"}
WORKER_SPANS = {"worker.request", "worker.queue", "worker.prefill", "worker.decode"}


def test_one_trace_per_request_joins_gateway_and_worker(stack, traffic):
    receiver = stack["receiver"]

    def complete():
        by_trace = {t: [s for s in receiver.spans if s["trace"] == t] for t in traffic}
        ok = all({s["name"] for s in spans} >= GATEWAY_SPANS | WORKER_SPANS for spans in by_trace.values())
        return by_trace if ok else None

    by_trace = wait_for("every request's gateway and worker spans", complete, tries=120, detail=lambda: {
        t: sorted(s["name"] for s in receiver.spans if s["trace"] == t) for t in {s["trace"] for s in receiver.spans}})
    for trace_id, parent in traffic.items():
        spans = by_trace[trace_id]
        named = {s["name"]: s for s in spans}
        root = named["gateway.request"]
        assert root["parent"] == parent and root["service"] == "tokenmill-gateway"  # the caller's trace, joined
        for name in ("gateway.admit", "gateway.queue", "gateway.dispatch", "gateway.stream_end"):
            assert named[name]["parent"] == root["id"], name
        work = named["worker.request"]
        assert work["service"] == "tokenmill-worker"
        assert work["parent"] == named["gateway.dispatch"]["id"]  # propagated over gRPC metadata
        for name in ("worker.queue", "worker.prefill", "worker.decode"):
            assert named[name]["parent"] == work["id"], name
        # phases in order: queue ends where prefill starts, prefill where decode starts
        assert named["worker.queue"]["end"] == named["worker.prefill"]["start"]
        assert named["worker.prefill"]["end"] == named["worker.decode"]["start"]
        assert root["start"] <= named["gateway.dispatch"]["start"] <= work["start"] <= work["end"] <= root["end"]
    assert len({s["trace"] for s in receiver.spans if s["name"] == "gateway.request"} & set(traffic)) == len(traffic)


def test_phase_histograms(stack, traffic):
    worker = scrape(stack["ports"]["worker"])
    n = len(traffic)
    for name in ("queue", "prefill", "decode", "inference"):
        assert sample_sum(worker, f"vllm:request_{name}_time_seconds_count") >= n, name
    assert sample_sum(worker, "vllm:request_decode_time_seconds_sum") > 0
    gateway = scrape(stack["ports"]["gateway"])
    assert sample_sum(gateway, "tokenmill:gateway_queue_time_seconds_count") >= n


def test_live_quality_histograms(stack, traffic):
    port = stack["ports"]["gateway"]

    def judged() -> str | None:
        text = scrape(port)
        return text if sample_sum(text, "tokenmill:quality_judged_total") >= 1 else None

    text = wait_for("the judge's score of a sampled request", judged)
    assert sample_sum(text, "tokenmill:quality_sampled_total") == len(traffic)  # rate 1: every completion
    assert sample_sum(text, "tokenmill:quality_errors_total") == 0
    for dim in [*DIMS, "overall"]:
        assert sample_sum(text, "tokenmill:quality_score_count", model="smollm2-135m", worker=stack["worker"],
                          dimension=dim) >= 1, dim
    assert 0 <= sample_sum(text, "tokenmill:quality_score_sum", dimension="overall") <= \
        sample_sum(text, "tokenmill:quality_score_count", dimension="overall")


def test_every_dashboard_query_and_recording_rule_returns_data(stack, traffic):
    sys.path.insert(0, str(MON))
    import dashboard

    groups = yaml.safe_load((MON / "prometheusrule.yaml").read_text())["spec"]["groups"]
    recorded = sorted({r["record"] for g in groups for r in g["rules"] if "record" in r})
    queries = dashboard.queries() + recorded + [r["expr"] for g in groups for r in g["rules"] if "record" in r]
    wait_for("the judge's score (quality panels)", lambda: sample_sum(scrape(stack["ports"]["gateway"]),
                                                                      "tokenmill:quality_judged_total") >= 1)

    def empty() -> list[str]:
        out = []
        for q in queries:
            r = httpx.get(f"{stack['prometheus']}/api/v1/query", params={"query": q}, timeout=10).json()
            assert r["status"] == "success", (q, r)
            if not r["data"]["result"]:
                out.append(q)
        return out

    missing: list[str] = []

    def none_missing() -> bool:
        missing[:] = empty()
        return not missing

    try:
        wait_for("every query to return a series", none_missing, tries=60)
    except pytest.fail.Exception:
        pytest.fail(f"queries with no series (a metric that does not exist?): {missing}")
    targets = httpx.get(f"{stack['prometheus']}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert sorted(t["labels"]["job"] for t in targets if t["health"] == "up") == ["gateway", "judge", "worker"]


def test_promtool_checks_and_unit_tests_the_rules(tmp_path):
    rules_file(tmp_path / "rules.yaml")
    shutil.copy(MON / "rules.test.yaml", tmp_path / "rules.test.yaml")
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", str(tmp_path / "rules.test.yaml")], capture_output=True,
                          text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = {r["alert"] for g in yaml.safe_load((MON / "prometheusrule.yaml").read_text())["spec"]["groups"]
              for r in g["rules"] if "alert" in r}
    tested = yaml.safe_load((MON / "rules.test.yaml").read_text())["tests"]
    assert len(alerts) == 5
    for alert in alerts:  # each alert: one case where it fires and one where it stays quiet
        cases = [c for t in tested for c in t.get("alert_rule_test", []) if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases), alert


def test_dashboard_json_is_generated_and_in_the_kustomization():
    from k8s_support import kustomize

    sys.path.insert(0, str(MON))
    import dashboard

    assert (MON / "dashboard.json").read_text() == dashboard.render(), \
        "k8s/monitoring/dashboard.json is stale: run python k8s/monitoring/dashboard.py"
    objects = kustomize("k8s/monitoring")
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(cm["data"]["tokenmill.json"])
    titles = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert titles == ["Traffic", "Latency", "Queue and engine", "Routing", "Quality (live, judged sample)"]
    assert {o["kind"] for o in objects} == {"ConfigMap", "PodMonitor", "PrometheusRule"}


def test_sampler_drops_when_the_judge_lags_and_counts_judge_errors(stack):
    """Off the request path: offer() never waits. A judge that never answers (nothing listens) holds the one
    worker task, the queue of one fills, the rest are dropped and counted; a judge that refuses is counted."""
    from services.gateway import metrics
    from services.gateway.quality import QualitySampler

    async def run() -> tuple[float, float]:
        dropped0 = metrics.quality_dropped._value.get()
        stuck = QualitySampler(f"127.0.0.1:{free_port()}", 1.0, queue_size=1, concurrency=1, seed=1)
        stuck.start()
        results = []
        for _ in range(5):
            results.append(stuck.offer(STORY, "Once upon a time an owl flew.", "m", "w"))
            await asyncio.sleep(0)  # let the worker task take what it can
        await stuck.close()
        refused = QualitySampler(stack["judge"], 1.0, rubric="no-such-rubric", seed=1)
        refused.start()
        errors0 = metrics.quality_errors.labels("INVALID_ARGUMENT")._value.get()
        assert refused.offer(STORY, "Once upon a time an owl flew.", "m", "w")
        for _ in range(600):
            if metrics.quality_errors.labels("INVALID_ARGUMENT")._value.get() > errors0:
                break
            await asyncio.sleep(0.1)
        await refused.close()
        assert results == [True, True, False, False, False]
        return metrics.quality_dropped._value.get() - dropped0, \
            metrics.quality_errors.labels("INVALID_ARGUMENT")._value.get() - errors0

    dropped, errors = asyncio.run(run())
    assert dropped == 3 and errors == 1


def test_demo_samples_with_its_stated_settings(stack, capsys):
    """`tokenmill up --demo`'s story: temperature 0.7, top_p 0.9, a repetition penalty (issue 25), printed."""
    from services.local import DEMO_SAMPLING, run_demo

    assert DEMO_SAMPLING["repetition_penalty"] > 1 and DEMO_SAMPLING["temperature"] == 0.7
    story = run_demo(stack["gateway"], None, max_tokens=8)
    out = capsys.readouterr().out
    assert "sampling: max_tokens 8, temperature 0.7, top_p 0.9, repetition_penalty 1.1, seed 7" in out
    assert story and story in out


def test_bad_settings_fail_clearly():
    from services.gateway.quality import QualitySampler

    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        QualitySampler("127.0.0.1:1", 1.5)
    with pytest.raises(ValueError, match="needs --judge-address"):
        QualitySampler("", 0.1)
    proc = subprocess.run([sys.executable, "-m", "services.cli", "gateway", "--judge-sample-rate", "0.5"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "needs --judge-address" in proc.stderr


def test_tracing_off_imports_nothing():
    """Off by default and free: the services never import OpenTelemetry unless an endpoint is set."""
    code = ("import sys, services.gateway.core, services.gateway.main, services.worker.server; "
            "from services.common import tracing; assert not tracing.enabled(); "
            "assert tracing.start('x') is None and tracing.traceparent(None) == ''; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
