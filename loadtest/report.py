"""The load-test report: summary figures, Markdown + HTML + JSON, and PNG plots, from one run's folder.

    python -m loadtest.report DIR        # (re)build DIR/report.md, report.html, summary.json, *.png

DIR holds what `tokenmill loadtest` wrote: locust_requests.csv (one row per request, see recorder.Outcome),
locust_run.json (start/stop times and options) and Locust's own locust_stats.csv / _failures.csv /
_stats_history.csv. Figures come from the per-request CSV; Locust's counts are checked against it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from bench.results import percentile

PERCENTILES = (50, 90, 95, 99)
PREFIX = "locust"
NOTE = ("TTFT: measured by the client for streams; for unary calls, the gateway's `timing.ttft_ms`. "
        "client − gateway latency: the client's end-to-end time less the gateway's `timing.total_ms` (network and "
        "client overhead; large values mean the load generator, not the server, is the bottleneck).")
PLOTS = {"throughput": "throughput.png", "latency": "latency_over_time.png", "distribution": "latency_distribution.png"}


# ---- reading -------------------------------------------------------------------------------------------------
def _num(value: str) -> float | None:
    if value in ("", None):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def read_requests(path: Path) -> list[dict]:
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key in ("epoch_s", "ttft_ms", "latency_ms", "prompt_tokens", "completion_tokens", "cached_tokens",
                        "tokens_per_s", "batch_size", "queue_ms", "gateway_ttft_ms", "gateway_total_ms",
                        "response_bytes", "client_ttft_ms"):
                row[key] = _num(row.get(key, ""))
            rows.append(row)
    return rows


def read_locust_stats(path: Path) -> dict[tuple[str, str], dict]:
    """(type, name) → {requests, failures} from Locust's _stats.csv (the Aggregated row left out)."""
    if not path.exists():
        return {}
    out = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":
                continue
            out[(row["Type"], row["Name"])] = {"requests": int(row["Request Count"]),
                                               "failures": int(row["Failure Count"])}
    return out


def read_locust_failures(path: Path) -> dict[tuple[str, str, str], int]:
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {(r["Method"], r["Name"], r["Error"]): int(r["Occurrences"]) for r in csv.DictReader(f)}


# ---- figures -------------------------------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None, "max": None}
    out = {f"p{p}": round(percentile(values, p / 100), 1) for p in PERCENTILES}
    return out | {"mean": round(sum(values) / len(values), 1), "max": round(float(max(values)), 1)}


def summarize(rows: list[dict], run: dict, locust_stats: dict, locust_failures: dict) -> dict:
    ok = [r for r in rows if r["status"] == "OK"]
    failed = [r for r in rows if r["status"] != "OK"]
    starts = [r["epoch_s"] for r in rows if r["epoch_s"] is not None]
    ends = [r["epoch_s"] + r["latency_ms"] / 1000 for r in rows if r["epoch_s"] is not None]
    t0 = run.get("start_epoch_s") or (min(starts) if starts else 0.0)
    t1 = run.get("stop_epoch_s") or (max(ends) if ends else t0)
    duration = max(t1 - t0, 1e-9)
    completion = sum(r["completion_tokens"] or 0 for r in ok)
    prompt = sum(r["prompt_tokens"] or 0 for r in ok)
    cached = sum(r["cached_tokens"] or 0 for r in ok)
    streamed = [r for r in ok if r["kind"] == "GenerateStream"]

    by_status = Counter(r["status"] for r in rows)
    failure_details: dict[str, dict] = {}
    for r in failed:
        d = failure_details.setdefault(r["status"], {"count": 0, "kinds": Counter(), "example": r["error"]})
        d["count"] += 1
        d["kinds"][r["kind"]] += 1
    for d in failure_details.values():
        d["kinds"] = dict(d["kinds"])

    # Locust's own counts, entry by entry, against the CSV: the "no request missing" check.
    expected: dict[tuple[str, str], dict] = defaultdict(lambda: {"requests": 0, "failures": 0})
    for r in rows:
        e = expected[(r["protocol"], r["kind"])]
        e["requests"] += 1
        e["failures"] += r["status"] != "OK"
        if r["client_ttft_ms"] is not None:
            expected[(r["protocol"], r["kind"] + " TTFT")]["requests"] += 1
    check = []
    for key in sorted(set(expected) | set(locust_stats)):
        mine, theirs = expected.get(key, {"requests": 0, "failures": 0}), locust_stats.get(key)
        check.append({"type": key[0], "name": key[1], "csv_requests": mine["requests"],
                      "csv_failures": mine["failures"],
                      "locust_requests": theirs["requests"] if theirs else None,
                      "locust_failures": theirs["failures"] if theirs else None,
                      "agree": theirs is not None and theirs == mine})
    failure_names = Counter()
    for (_method, name, error), n in locust_failures.items():
        failure_names[(name, error)] += n
    csv_failure_names = Counter((r["kind"], r["status"]) for r in failed)

    workers = Counter(r["worker"] for r in ok if r["worker"])
    batch = [r["batch_size"] for r in ok if r["batch_size"]]
    return {
        "host": run.get("host"), "user_classes": run.get("user_classes"),
        "users": run.get("num_users"), "spawn_rate": run.get("spawn_rate"), "run_time": run.get("run_time"),
        "max_tokens": run.get("max_tokens"), "temperature": run.get("temperature"),
        "stream_ratio": run.get("stream_ratio"), "wait_s": [run.get("wait_min"), run.get("wait_max")],
        "start_epoch_s": t0, "duration_s": round(duration, 1),
        "requests": len(rows), "ok": len(ok), "failed": len(failed),
        "abandoned_in_flight": run.get("requests_abandoned"),
        "success_rate": round(len(ok) / len(rows), 4) if rows else None,
        "requests_per_hour": round(len(ok) / duration * 3600, 1),
        "attempts_per_hour": round(len(rows) / duration * 3600, 1),
        "output_tokens_per_s": round(completion / duration, 2),
        "prompt_tokens": prompt, "completion_tokens": completion, "cached_prompt_tokens": cached,
        "mean_completion_tokens": round(completion / len(ok), 1) if ok else None,
        "latency_ms": percentiles([r["latency_ms"] for r in ok]),
        "ttft_ms": percentiles([r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]),
        "ttft_stream_ms": percentiles([r["client_ttft_ms"] for r in streamed if r["client_ttft_ms"] is not None]),
        "queue_ms": percentiles([r["queue_ms"] for r in ok if r["queue_ms"] is not None]),
        # client latency minus the gateway's own total: network + client overhead (a check on the measurement)
        "client_overhead_ms": percentiles([r["latency_ms"] - r["gateway_total_ms"] for r in ok
                                           if r["gateway_total_ms"] is not None]),
        "tokens_per_s_per_request": percentiles([r["tokens_per_s"] for r in ok if r["tokens_per_s"] is not None]),
        "mean_batch_size": round(sum(batch) / len(batch), 2) if batch else None,
        "by_kind": dict(Counter(r["kind"] for r in rows)),
        "by_status": dict(by_status),
        "failures": failure_details,
        "workers": dict(workers),
        "locust_check": check,
        "locust_agrees": bool(check) and all(c["agree"] for c in check),
        "failure_names_agree": dict(csv_failure_names) == dict(failure_names),
    }


# ---- plots ---------------------------------------------------------------------------------------------------
def _bucket_s(duration: float, requests: int) -> float:
    """Round seconds, at most ~90 buckets over the run and ~5 requests a bucket on average (1 min for an hour
    of the seed's load, a few seconds for a short local run)."""
    least = max(duration / 90, duration * 5 / max(requests, 1))
    for b in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if b >= least:
            return b
    return 900


def plot(rows: list[dict], summary: dict, out: Path, history: Path | None = None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t0, duration = summary["start_epoch_s"], summary["duration_s"]
    bucket = _bucket_s(duration, len(rows))
    nb = max(1, math.ceil(duration / bucket))
    ok = [r for r in rows if r["status"] == "OK"]
    failed = [r for r in rows if r["status"] != "OK"]

    def end_t(r: dict) -> float:
        return r["epoch_s"] + r["latency_ms"] / 1000 - t0

    def per_bucket(items, weight=lambda r: 1.0):
        counts = np.zeros(nb)
        for r in items:
            counts[min(nb - 1, max(0, int(end_t(r) // bucket)))] += weight(r)
        return counts

    centers = (np.arange(nb) + 0.5) * bucket
    paths = {name: out / file for name, file in PLOTS.items()}

    # throughput over time
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    ax1.plot(centers, per_bucket(ok) / bucket * 60, marker=".", label="completed (OK)")
    if failed:
        for status, n in Counter(r["status"] for r in failed).most_common(4):
            ax1.plot(centers, per_bucket([r for r in failed if r["status"] == status]) / bucket * 60,
                     marker=".", linestyle="--", label=f"{status} ({n})")
    ax1.set_ylabel("requests / min")
    ax1.set_title(f"Throughput ({bucket:g} s buckets) · {summary['requests_per_hour']:,.0f} requests/hour OK")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="upper left", fontsize=8)
    users = _users_over_time(history, t0) if history else None
    if users:
        axu = ax1.twinx()
        axu.step([u[0] for u in users], [u[1] for u in users], where="post", color="grey", alpha=0.5)
        axu.set_ylabel("users", color="grey")
    ax2.plot(centers, per_bucket(ok, lambda r: r["completion_tokens"] or 0) / bucket, marker=".", color="C2")
    ax2.set_ylabel("output tokens / s")
    ax2.set_xlabel("seconds since start")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["throughput"], dpi=110)
    plt.close(fig)

    # latency over time: every request, with p50/p95 per bucket
    fig, ax = plt.subplots(figsize=(10, 5))
    if ok:
        ends = np.array([end_t(r) for r in ok])
        lat = np.array([r["latency_ms"] / 1000 for r in ok])
        ax.scatter(ends, lat, s=6, alpha=0.35, label="latency (end to end)")
        ttft = [(end_t(r), r["ttft_ms"] / 1000) for r in ok if r["ttft_ms"] is not None]
        if ttft:
            ax.scatter(*zip(*ttft, strict=True), s=6, alpha=0.35, color="C1", label="TTFT")
        idx = np.minimum(nb - 1, (ends // bucket).astype(int))
        for p, style in ((50, "-"), (95, "--")):
            ys = [np.percentile(lat[idx == i], p) if (idx == i).any() else np.nan for i in range(nb)]
            ax.plot(centers, ys, style, marker=".", color="C3", label=f"latency p{p} per {bucket:g} s")
    ax.set_xlabel("completion time, seconds since start")
    ax.set_ylabel("seconds")
    ax.set_title("Latency over time (successful requests)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["latency"], dpi=110)
    plt.close(fig)

    # latency distribution
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title, color in ((ax1, "latency_ms", "End-to-end latency", "C0"), (ax2, "ttft_ms", "TTFT", "C1")):
        values = [r[key] / 1000 for r in ok if r[key] is not None]
        if values:
            ax.hist(values, bins=min(60, max(10, len(values) // 5)), color=color, alpha=0.8)
            for p, style in ((50, "-"), (95, "--"), (99, ":")):
                v = float(np.percentile(values, p))
                ax.axvline(v, color="k", linestyle=style, linewidth=1, label=f"p{p} {v:.2f} s")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title} ({len(values)} requests)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("requests")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["distribution"], dpi=110)
    plt.close(fig)
    return paths


def _users_over_time(history: Path, t0: float) -> list[tuple[float, int]] | None:
    if not history.exists():
        return None
    out = []
    with history.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated" and row.get("Timestamp") and row.get("User Count"):
                out.append((float(row["Timestamp"]) - t0, int(row["User Count"])))
    return out or None


# ---- rendering -----------------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "–" if v is None else (f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms")


def _rows_md(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def tables(s: dict) -> dict[str, tuple[list[str], list[list]]]:
    rate = "–" if s["success_rate"] is None else f"{s['success_rate'] * 100:.2f} %"
    headline = (["figure", "value"], [
        ["requests (all)", f"{s['requests']:,}"],
        ["successful", f"{s['ok']:,}"],
        ["failed", f"{s['failed']:,}"],
        ["success rate", rate],
        ["in flight at the stop, not counted", "–" if s["abandoned_in_flight"] is None
         else f"{s['abandoned_in_flight']:,}"],
        ["duration", f"{s['duration_s']:,.0f} s"],
        ["**requests/hour** (successful)", f"**{s['requests_per_hour']:,.0f}**"],
        ["output tokens/s (all users)", f"{s['output_tokens_per_s']:,.1f}"],
        ["mean completion tokens", s["mean_completion_tokens"] if s["mean_completion_tokens"] is not None else "–"],
        ["mean batch size at the gateway", s["mean_batch_size"] if s["mean_batch_size"] is not None else "–"],
    ])
    lat_rows = []
    for label, key in (("latency (end to end)", "latency_ms"), ("TTFT", "ttft_ms"),
                       ("TTFT, streams (client-side)", "ttft_stream_ms"), ("gateway queue", "queue_ms"),
                       ("client − gateway latency", "client_overhead_ms")):
        p = s[key]
        lat_rows.append([label, *(_ms(p[f"p{q}"]) for q in PERCENTILES), _ms(p["mean"]), _ms(p["max"])])
    tps = s["tokens_per_s_per_request"]
    lat_rows.append(["tokens/s per request", *(("–" if tps[f"p{q}"] is None else f"{tps[f'p{q}']:.1f}")
                                               for q in PERCENTILES),
                     "–" if tps["mean"] is None else f"{tps['mean']:.1f}", "–" if tps["max"] is None
                     else f"{tps['max']:.1f}"])
    latency = (["", *(f"p{q}" for q in PERCENTILES), "mean", "max"], lat_rows)
    statuses = (["status", "count", "share", "by kind", "example"],
                [[st, n, f"{n / s['requests'] * 100:.1f} %",
                  ", ".join(f"{k} {c}" for k, c in s["failures"].get(st, {}).get("kinds", {}).items()) or "–",
                  (s["failures"].get(st, {}).get("example") or "")[:120]]
                 for st, n in sorted(s["by_status"].items(), key=lambda kv: -kv[1])])
    check = (["type", "name", "CSV requests", "Locust requests", "CSV failures", "Locust failures", "agree"],
             [[c["type"], c["name"], c["csv_requests"], c["locust_requests"], c["csv_failures"],
               c["locust_failures"], "yes" if c["agree"] else "**NO**"] for c in s["locust_check"]])
    workers = (["worker", "requests"], [[w, n] for w, n in sorted(s["workers"].items())])
    return {"headline": headline, "latency": latency, "statuses": statuses, "check": check, "workers": workers}


def _setup_line(s: dict) -> str:
    wait = s["wait_s"]
    run_time = s["run_time"]
    run_time = f"{run_time:,} s" if isinstance(run_time, int | float) else run_time
    streamed = "–" if s["stream_ratio"] is None else f"{s['stream_ratio'] * 100:g} %"
    return (f"Target `{s['host']}` ({', '.join(s['user_classes'] or [])}), {s['users']} users spawned at "
            f"{s['spawn_rate']}/s for {run_time}; max_tokens {s['max_tokens']}, temperature "
            f"{s['temperature']}, {streamed} of requests streamed, think time {wait[0]}–{wait[1]} s; "
            f"prompts from the children's story set, sent as chat messages.")


def render_markdown(s: dict, title: str) -> str:
    t = tables(s)
    lines = [f"# {title}", "", _setup_line(s), ""]
    if s.get("command"):
        lines += ["```", s["command"], "```", ""]
    lines += [*_rows_md(*t["headline"]), "", "## Latency (successful requests)", ""]
    lines += _rows_md(*t["latency"])
    lines += ["", NOTE, ""]
    lines += ["## Status of every request", "", *_rows_md(*t["statuses"])]
    if t["workers"][1]:
        lines += ["", "## Workers", "", *_rows_md(*t["workers"])]
    agree = "all counts agree" if s["locust_agrees"] else "**counts disagree**"
    lines += ["", f"## Locust's counts against the per-request CSV: {agree}", "", *_rows_md(*t["check"])]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({file})" for name, file in PLOTS.items()]
    lines += ["", "Files: `locust_requests.csv` (one row per request), `locust_stats.csv`, `locust_failures.csv`, "
              "`locust_stats_history.csv`, `locust.html` (Locust's own report), `summary.json`.", ""]
    return "\n".join(lines)


def _md_inline(text: str) -> str:
    out = html.escape(str(text))
    while out.count("**") >= 2:
        out = out.replace("**", "<b>", 1).replace("**", "</b>", 1)
    while out.count("`") >= 2:
        out = out.replace("`", "<code>", 1).replace("`", "</code>", 1)
    return out


def _table_html(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_md_inline(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_md_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(s: dict, title: str, plots: dict[str, Path]) -> str:
    t = tables(s)
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.name}</figcaption></figure>" for name, p in plots.items() if p.exists())
    agree = "all counts agree" if s["locust_agrees"] else "<b>counts disagree</b>"
    style = ("body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #ccc;padding:.3em .7em;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}code{background:#f3f3f3;padding:0 .2em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{_md_inline(_setup_line(s))}</p>"
            + (f"<pre><code>{html.escape(s['command'])}</code></pre>" if s.get("command") else "") +
            f"{_table_html(*t['headline'])}<h2>Latency (successful requests)</h2>{_table_html(*t['latency'])}"
            f"<p>{_md_inline(NOTE)}</p><h2>Status of every request</h2>{_table_html(*t['statuses'])}"
            + (f"<h2>Workers</h2>{_table_html(*t['workers'])}" if t["workers"][1] else "")
            + f"<h2>Locust's counts against the per-request CSV: {agree}</h2>{_table_html(*t['check'])}"
            f"<h2>Plots</h2>{imgs}</body></html>\n")


def write_report(out: Path, title: str = "tokenmill load test") -> dict:
    """Read the run's CSVs in `out`, write report.md, report.html, summary.json and the plots; return the summary."""
    out = Path(out)
    rows = read_requests(out / f"{PREFIX}_requests.csv")
    run_path = out / f"{PREFIX}_run.json"
    run = json.loads(run_path.read_text()) if run_path.exists() else {}
    s = summarize(rows, run, read_locust_stats(out / f"{PREFIX}_stats.csv"),
                  read_locust_failures(out / f"{PREFIX}_failures.csv"))
    plots = plot(rows, s, out, out / f"{PREFIX}_stats_history.csv")
    s["plots"] = {name: p.name for name, p in plots.items()}
    command = out / "command.txt"
    s["command"] = command.read_text().splitlines()[0] if command.exists() else None
    (out / "report.md").write_text(render_markdown(s, title))
    (out / "report.html").write_text(render_html(s, title, plots))
    (out / "summary.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
    return s


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    s = write_report(Path(args[0]))
    print((Path(args[0]) / "report.md").read_text())
    return 0 if s["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
