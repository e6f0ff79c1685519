"""The tokenmill Grafana dashboard, generated: `python k8s/monitoring/dashboard.py` writes dashboard.json beside
this file (the monitoring kustomization puts it in a ConfigMap Grafana's sidecar picks up). Each panel is a
(title, unit, [(PromQL, legend)]) row here; tests/test_observability.py runs every query against a real
Prometheus scraping a live suite and fails on one that returns no series, and fails when dashboard.json is
not what this file writes.

Heavy queries (quantiles over histograms, the quality baselines) read the recording rules of
prometheusrule.yaml (`tokenmill:*:*` names) instead of recomputing them on every refresh.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboard.json"
UID = "tokenmill-overview"

# (row title, [(panel title, unit, [(expr, legend), ...]), ...])
ROWS = [
    ("Traffic", [
        ("Requests by status", "reqps", [
            ('sum by (status) (rate(tokenmill:gateway_requests_total[1m]))', "{{status}}")]),
        ("Output tokens / s", "short", [
            ("tokenmill:generation_tokens:rate1m", "all workers"),
            ("sum by (instance) (rate(vllm:generation_tokens_total[1m]))", "{{instance}}")]),
        ("Error ratio (5m)", "percentunit", [("tokenmill:gateway_error_ratio:rate5m", "errors / all")]),
    ]),
    ("Latency", [
        ("Time to first token (gateway)", "s", [
            ('tokenmill:gateway_ttft_seconds:quantile5m{quantile="0.5"}', "p50"),
            ('tokenmill:gateway_ttft_seconds:quantile5m{quantile="0.95"}', "p95"),
            ('tokenmill:gateway_ttft_seconds:quantile5m{quantile="0.99"}', "p99")]),
        ("Inter-token latency (workers)", "s", [
            ('tokenmill:inter_token_latency_seconds:quantile5m{quantile="0.5"}', "p50"),
            ('tokenmill:inter_token_latency_seconds:quantile5m{quantile="0.95"}', "p95"),
            ('tokenmill:inter_token_latency_seconds:quantile5m{quantile="0.99"}', "p99")]),
        ("End-to-end latency p95", "s", [
            ("histogram_quantile(0.95, sum by (le) (rate(tokenmill:gateway_e2e_request_latency_seconds_bucket[5m])))",
             "gateway")]),
        ("Request phases p95", "s", [
            ("histogram_quantile(0.95, sum by (le) (rate(tokenmill:gateway_queue_time_seconds_bucket[5m])))",
             "gateway queue"),
            ("histogram_quantile(0.95, sum by (le) (rate(vllm:request_queue_time_seconds_bucket[5m])))",
             "worker queue"),
            ("histogram_quantile(0.95, sum by (le) (rate(vllm:request_prefill_time_seconds_bucket[5m])))", "prefill"),
            ("histogram_quantile(0.95, sum by (le) (rate(vllm:request_decode_time_seconds_bucket[5m])))", "decode")]),
    ]),
    ("Queue and engine", [
        ("Gateway queue", "short", [("sum(tokenmill:gateway_queue_depth)", "queued"),
                                    ("sum(tokenmill:gateway_queue_capacity)", "bound")]),
        ("Running / waiting requests", "short", [
            ("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
            ("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}")]),
        ("KV-cache use", "percentunit", [("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}")]),
        ("Prefix-cache hit rate", "percentunit", [("tokenmill:prefix_cache_hit_ratio:rate5m", "all workers")]),
        ("Preemptions / s", "short", [("sum by (instance) (rate(vllm:num_preemptions_total[5m]))", "{{instance}}")]),
    ]),
    ("Routing", [
        ("Routing decisions by reason", "short", [
            ("sum by (reason) (rate(tokenmill:routing_prefix_hits_total[5m]))", "{{reason}}")]),
        ("Retries and live workers", "short", [("sum(rate(tokenmill:gateway_retries_total[5m]))", "retries / s"),
                                               ("sum(tokenmill:gateway_workers_live)", "live workers")]),
    ]),
    ("Quality (live, judged sample)", [
        ("Quality by dimension (1 h mean)", "percentunit", [
            ("avg by (dimension) (tokenmill:quality_score:mean1h)", "{{dimension}}")]),
        ("Overall quality by worker vs its 24 h baseline", "percentunit", [
            ('tokenmill:quality_score:mean1h{dimension="overall"}', "{{worker}} (1 h)"),
            ('tokenmill:quality_score:baseline24h{dimension="overall"}', "{{worker}} (24 h)")]),
        ("Judge sample: judged, dropped, errors", "short", [
            ("sum(rate(tokenmill:quality_judged_total[5m]))", "judged / s"),
            ("sum(rate(tokenmill:quality_dropped_total[5m]))", "dropped / s"),
            ("sum(rate(tokenmill:quality_errors_total[5m]))", "errors / s")]),
    ]),
]


def panels() -> list[dict]:
    out, y, pid = [], 0, 1
    for row, items in ROWS:
        out.append({"type": "row", "title": row, "id": pid, "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        width = 24 // len(items) if len(items) <= 4 else 8
        for i, (title, unit, queries) in enumerate(items):
            out.append({
                "type": "timeseries", "title": title, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": width, "x": (i * width) % 24, "y": y + 8 * ((i * width) // 24)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                            for j, (expr, legend) in enumerate(queries)],
            })
            pid += 1
        y += 8 * ((len(items) * width + 23) // 24)
    return out


def dashboard() -> dict:
    return {
        "uid": UID, "title": "tokenmill", "tags": ["tokenmill", "llm-serving"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def queries() -> list[str]:
    return [expr for _, items in ROWS for _, _, qs in items for expr, _ in qs]


def render() -> str:
    return json.dumps(dashboard(), indent=1) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
