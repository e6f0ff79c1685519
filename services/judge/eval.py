"""`tokenmill eval`: generate a story for each held-out prompt through the gateway, judge it, report.

The held-out set (services/judge/data/eval_set.json) holds 30 prompts built from the story template
"Write a single paragraph moral story for children about a {character} who learns the value of {moral}
in a {setting}." with a hand-written reference story each. Each prompt goes through the gateway's public
`tokenmill.v1.Inference/Generate` (greedy), the response is scored by the Judge service, and
`<out>/eval_results.json` gets prompt, response, per-dimension scores, overall and fluency per item plus
the means. Progress prints one line per finished item; a summary table closes the run.

Runs on a laptop against `tokenmill up` and in the cluster as the `tokenmill-eval` Job. Module imports stay
light (no torch, no grpc until the command runs).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import typer

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "eval_set.json"
RESULTS_FILE = "eval_results.json"


def load_eval_set(path: Path = DEFAULT_DATA, limit: int = 0) -> list[dict[str, Any]]:
    """Rows of a prompt set: id, prompt, reference (character, moral, setting when known).

    A `.json` file holds a list of objects (the built-in set: a .json file ships in the wheel);
    any other file is JSON Lines, one object per line.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError(f"{path}: expected a JSON list of objects with 'prompt'")
    else:
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = []
    for n, row in enumerate(raw, 1):
        if not isinstance(row, dict) or not row.get("prompt"):
            raise ValueError(f"{path}: item {n} needs a non-empty 'prompt'")
        row.setdefault("id", f"item-{n:02d}")
        rows.append(row)
    return rows[:limit] if limit > 0 else rows


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / min / max of every dimension, overall and fluency over the items that were scored."""
    scored = [it for it in items if "overall" in it]
    keys: list[str] = []
    for it in scored:
        keys += [k for k in it["scores"] if k not in keys]
    table: dict[str, dict[str, float]] = {}

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.fmean(values), 4), "min": round(min(values), 4),
                "max": round(max(values), 4)}

    for k in keys:
        values = [it["scores"][k] for it in scored if k in it["scores"]]
        table[k] = stats(values)
    if scored:
        table["overall"] = stats([it["overall"] for it in scored])
    flu = [it["fluency"] for it in scored if it.get("fluency") is not None]
    if flu:
        table["fluency"] = stats(flu)
    refs = [it["reference_judge"]["overall"] for it in scored if "reference_judge" in it]
    if refs:
        table["reference_overall"] = stats(refs)
    return {"items": len(items), "scored": len(scored), "errors": len(items) - len(scored), "metrics": table}


def format_table(summary: dict[str, Any]) -> str:
    rows = summary["metrics"]
    width = max([len(k) for k in rows] + [len("dimension")])
    lines = [f"{'dimension':<{width}}  {'mean':>7}  {'min':>7}  {'max':>7}", "-" * (width + 27)]
    for k, s in rows.items():
        if k == "overall":
            lines.append("-" * (width + 27))
        label = "fluency (nats/tok)" if k == "fluency" else k
        lines.append(f"{label:<{width}}  {s['mean']:7.3f}  {s['min']:7.3f}  {s['max']:7.3f}")
    lines.append(f"{summary['scored']}/{summary['items']} items scored, {summary['errors']} errors")
    return "\n".join(lines)


def _score_dict(res: Any) -> dict[str, Any]:
    out = {"scores": {s.name: round(s.score, 4) for s in res.scores}, "overall": round(res.overall, 4),
           "fluency": round(res.fluency, 4) if res.HasField("fluency") else None}
    if res.rationale:
        out["rationale"] = res.rationale
    return out


async def _run(rows: list[dict[str, Any]], gateway: str, judge: str, max_tokens: int, rubric: str,
               concurrency: int, api_key: str, references: bool, timeout: float,
               connect_timeout: float) -> list[dict[str, Any]]:
    import grpc

    from services.common.pb import inference_pb2, inference_pb2_grpc, judge_pb2, judge_pb2_grpc

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    sem = asyncio.Semaphore(max(1, concurrency))
    results: list[dict[str, Any]] = [{} for _ in rows]
    done = 0
    t_start = time.perf_counter()
    async with grpc.aio.insecure_channel(gateway) as gch, grpc.aio.insecure_channel(judge) as jch:
        for name, address, channel in (("gateway", gateway, gch), ("judge", judge, jch)):
            try:
                await asyncio.wait_for(channel.channel_ready(), connect_timeout)
            except TimeoutError:
                raise ConnectionError(f"cannot reach the {name} at {address} within {connect_timeout:.0f}s "
                                      f"(is it running? see --{name})") from None
        gen = inference_pb2_grpc.InferenceStub(gch)
        jud = judge_pb2_grpc.JudgeStub(jch)

        async def one(i: int, row: dict[str, Any]) -> None:
            nonlocal done
            item: dict[str, Any] = {"id": row["id"], "prompt": row["prompt"]}
            if row.get("reference"):
                item["reference"] = row["reference"]
            t0 = time.perf_counter()
            async with sem:
                try:
                    req = inference_pb2.GenerateRequest(
                        request_id=f"eval-{row['id']}",
                        messages=[inference_pb2.ChatMessage(role="user", content=row["prompt"])],
                        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))
                    resp = await gen.Generate(req, timeout=timeout, metadata=metadata)
                    item.update(response=resp.text, finish_reason=inference_pb2.FinishReason.Name(
                        resp.finish_reason).removeprefix("FINISH_REASON_").lower(),
                        completion_tokens=resp.usage.completion_tokens, generate_ms=round(resp.timing.total_ms, 1))
                    if not resp.text.strip():
                        raise ValueError("the gateway returned an empty response")
                    t1 = time.perf_counter()
                    res = await jud.Score(judge_pb2.ScoreRequest(id=row["id"], prompt=row["prompt"],
                                                                 response=resp.text, rubric=rubric),
                                          timeout=timeout)
                    item.update(_score_dict(res), judge_ms=round((time.perf_counter() - t1) * 1000, 1),
                                judge_backend=res.backend, rubric=res.rubric)
                    if references and row.get("reference"):
                        ref = await jud.Score(judge_pb2.ScoreRequest(id=row["id"] + "-ref", prompt=row["prompt"],
                                                                     response=row["reference"], rubric=rubric),
                                              timeout=timeout)
                        item["reference_judge"] = _score_dict(ref)
                except grpc.aio.AioRpcError as exc:
                    item["error"] = f"{exc.code().name}: {exc.details()}"
                except ValueError as exc:
                    item["error"] = str(exc)
            results[i] = item
            done += 1
            took = time.perf_counter() - t0
            if "error" in item:
                line = f"ERROR {item['error']}"
            else:
                flu = f"  fluency {item['fluency']:.2f}" if item.get("fluency") is not None else ""
                line = (f"{item.get('completion_tokens', 0):4d} tok  overall {item['overall']:.3f}{flu}  "
                        + " ".join(f"{k}={v:.2f}" for k, v in item["scores"].items()))
            typer.echo(f"[{done:>{len(str(len(rows)))}}/{len(rows)}] {row['id']}  {took:6.1f}s  {line}  "
                       f"(elapsed {time.perf_counter() - t_start:.0f}s)", err=True)

        await asyncio.gather(*(one(i, row) for i, row in enumerate(rows)))
    return results


def eval_command(
    gateway: str = typer.Option("127.0.0.1:50051", envvar="TOKENMILL_GATEWAY", help="Gateway gRPC address."),
    judge: str = typer.Option("127.0.0.1:50071", envvar="TOKENMILL_JUDGE", help="Judge gRPC address."),
    out: Path = typer.Option(Path("results/eval"), help=f"Folder for {RESULTS_FILE} (created if missing)."),
    limit: int = typer.Option(0, help="Only the first N prompts; 0 = all of them."),
    max_tokens: int = typer.Option(256, help="max_tokens of each generated story."),
    rubric: str = typer.Option("children-story", help="Judge rubric."),
    data: Path = typer.Option(DEFAULT_DATA, help="Prompts: a JSON list (.json) or JSON Lines of "
                              "{id, prompt, reference}."),
    concurrency: int = typer.Option(8, help="Prompts in flight at once (the gateway batches them)."),
    references: bool = typer.Option(False, help="Also judge each reference story (a baseline for the judge)."),
    api_key: str = typer.Option("", envvar="TOKENMILL_API_KEY", help="Gateway API key, if it needs one."),
    timeout: float = typer.Option(900.0, help="Deadline of each Generate / Score call, seconds."),
    connect_timeout: float = typer.Option(120.0, help="How long to wait for the gateway and judge to be reachable."),
) -> None:
    """Generate a story for every held-out prompt through the gateway, judge each, write eval_results.json."""
    if max_tokens < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--max-tokens")
    rows = load_eval_set(data, limit)
    if not rows:
        raise typer.BadParameter(f"{data} holds no prompts", param_hint="--data")
    typer.echo(f"eval: {len(rows)} prompts from {data.name} -> gateway {gateway}, judge {judge} "
               f"(rubric {rubric}, max_tokens {max_tokens})", err=True)
    t0 = time.perf_counter()
    try:
        items = asyncio.run(_run(rows, gateway, judge, max_tokens, rubric, concurrency, api_key, references,
                                 timeout, connect_timeout))
    except ConnectionError as exc:
        typer.echo(f"eval: {exc}", err=True)
        sys.exit(2)
    summary = summarise(items)
    report = {"gateway": gateway, "judge": judge, "rubric": rubric, "max_tokens": max_tokens, "data": str(data),
              "elapsed_s": round(time.perf_counter() - t0, 1), "summary": summary, "items": items}
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    typer.echo("\n" + format_table(summary))
    typer.echo(f"\nwrote {path} ({report['elapsed_s']:.0f}s)")
    if summary["errors"]:
        for it in items:
            if "error" in it:
                typer.echo(f"  {it['id']}: {it['error']}", err=True)
        sys.exit(1)
