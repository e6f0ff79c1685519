"""`tokenmill bench compare`: tokenmill vs the seed's design vs transformers vs llama.cpp (vs vLLM), side by side.

Each system is started on 127.0.0.1 with the same model, one at a time, and gets the same requests in the same
order from closed-loop clients (bench/harness.py) at each concurrency. The systems are in bench/systems.py.

Systems
- tokenmill:       gateway + paged-engine worker, as processes, driven over gRPC (Inference.GenerateStream).
- hf-static:       gateway + hf-static worker (the seed's design: static batch window + model.generate), gRPC.
- transformers-cb: transformers' ContinuousBatchingManager in this process (explicit ContinuousBatchingConfig).
- llama.cpp:       `llama-server` on the model's GGUF, one slot per client, OpenAI HTTP streaming. Needs the binary
                   built by bench/peers/install_llama_cpp.sh; skipped (with the reason) when it is absent.
- vllm:            `python -m vllm.entrypoints.openai.api_server` on the safetensors copy, when vllm is importable.

Workloads
- story:    story prompts, chat template, greedy, max_tokens drawn from min..max with a fixed seed (EOS may stop early).
- fixed128: the same prompts, max_tokens 128 and ignore_eos: every system produces exactly the same token count.
- long:     ~1,000-token prompts (--long-tokens): an excerpt of the docstrings of Python's own standard library (text
            that ships with every Python, so every machine builds the same prompts from the same interpreter) and a
            question about it, max_tokens 128 and ignore_eos. Each excerpt starts at its own offset and each
            concurrency level (and each warm-up) gets its own excerpts, so no prompt's prefix is cached by an
            earlier run: the prefill is measured, not a prefix-cache hit.

Every row reports prompt tokens/s: the summed prompt tokens over the summed TTFTs (the prefill rate a client sees,
queueing included; at concurrency 1 the server's prefill speed), beside TTFT p50/p95.

A peer that dies is reported as crashed, with how (exit code or signal, e.g. SIGSEGV), where (workload and
concurrency) and the last lines of its log, in the JSON (`crashed`) and the printed table. llama.cpp's build record
(<binary>.build.json, written by bench/peers/install_llama_cpp.sh: cmake flags, server args such as --no-repack,
probe attempts) is copied into the JSON (`peers`), and its server args are used.

Peak memory is the summed RSS of the system's server processes (gateway + worker for tokenmill; for the in-process
transformers-cb it is this whole process, client included). Writes results/compare.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.harness import MemoryPoller
from bench.report import COMPARE_COLUMNS, compare_cells, environment, markdown_table, options_record, print_row, table
from bench.results import Result, summarise
from bench.systems import SYSTEMS, System, make_system
from bench.workloads import Work, drawn_work, long_prompts

WORKLOADS = ("story", "fixed128", "long")


@dataclass
class Options:
    systems: tuple[str, ...] = SYSTEMS
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int = 64
    requests_c1: int = 0  # requests at concurrency 1; 0 = same as --requests
    workloads: tuple[str, ...] = WORKLOADS
    min_tokens: int = 32
    max_tokens: int = 256
    fixed_tokens: int = 128
    long_tokens: int = 1000  # long: prompt length (chat template included) aimed at
    seed: int = 0
    model: str = "smollm2-135m"
    threads: int = 0  # torch / llama.cpp threads; 0 = each system's default (llama.cpp: all cores)
    dtype: str = "auto"  # of every PyTorch system (tokenmill, hf-static, transformers-cb): the same for all
    llama_server: str = ""  # path; "" = <peers dir>/llama-server
    out_dir: Path = Path("results")


def build_works(tokenizer: Any, opts: Options) -> dict[str, Work]:
    unknown = set(opts.workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workload(s) {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    n = max(opts.requests, opts.requests_c1) + 1  # + the warm-up request
    works: dict[str, Work] = {}
    if {"story", "fixed128"} & set(opts.workloads):
        story = drawn_work(tokenizer, "story", n, opts.seed, opts.min_tokens, opts.max_tokens)
        works["story"] = story
        works["fixed128"] = replace(story, name="fixed128", max_tokens=[opts.fixed_tokens] * n, ignore_eos=True)
    if "long" in opts.workloads:
        count = n * len(opts.concurrency)
        prompts, ids, source = long_prompts(tokenizer, count, opts.long_tokens)
        works["long"] = Work("long", prompts, ids, [opts.fixed_tokens] * count, True, fresh=True, source=source)
    return {w: works[w] for w in opts.workloads}


class Crashed(RuntimeError):
    """A system's server process died under the benchmark: where (workload, concurrency, phase), how, its log."""

    def __init__(self, where: dict[str, Any], error: BaseException, crash: dict[str, Any]) -> None:
        self.record = {**where, **crash, "error": f"{type(error).__name__}: {error}"[:1000]}
        at = f"{where['workload']} c={where['concurrency']}" if where["workload"] else f"c={where['concurrency']}"
        super().__init__(f"{crash['process']} {crash['exit']} during {where['phase']} ({at})")


# ---- run ------------------------------------------------------------------------------------------------------
def run_system(system: System, works: dict[str, Work], opts: Options, rows: list[Result]) -> None:
    """Every workload at every concurrency; a server process that dies raises Crashed (where, how, its log)."""
    where: dict[str, Any] = {}

    def measure(k: int, conc: int) -> None:
        for work in works.values():
            n = opts.requests_c1 if (conc == 1 and opts.requests_c1) else opts.requests
            timed, warm = work.level(k, max(opts.requests, opts.requests_c1))
            timed = replace(timed, prompts=timed.prompts[:n], prompt_ids=timed.prompt_ids[:n],
                            max_tokens=timed.max_tokens[:n])
            where.update(workload=work.name, concurrency=conc, phase="warm-up")
            asyncio.run(system.session(warm, 1, 1))  # warm the path (first request pays lazy init)
            where["phase"] = "timed run"
            with MemoryPoller(system.pids(), period=0.2) as mem:
                samples, wall = asyncio.run(system.session(timed, n, conc))
            row = summarise(system.name, system.transport, work.name, conc, samples, wall, mem.peak_rss)
            prompt_tokens = sum(map(len, timed.prompt_ids))
            row.extra.update(prompt_tokens=prompt_tokens,
                             prompt_tok_s=prompt_tokens / max(1e-9, sum(s.ttft for s in samples)))
            rows.append(row)
            print_row(COMPARE_COLUMNS, compare_cells(row))

    levels = list(enumerate(opts.concurrency))
    runs = ([(conc, [(k, conc)]) for k, conc in levels] if system.restart_per_concurrency
            else [(max(opts.concurrency), levels)])
    for start_conc, group in runs:
        where.update(workload=None, concurrency=start_conc, phase="start")
        try:
            system.start(start_conc)
            for k, conc in group:
                measure(k, conc)
        except Exception as exc:
            crash = system.crash()
            if crash is None:
                raise
            raise Crashed(dict(where), exc, crash) from exc
        finally:
            system.stop()


def crash_cells(system: str, crash: dict[str, Any]) -> list[str]:
    """A crashed system's row: where it died, CRASHED and the signal (or exit code) in place of numbers."""
    how = crash["signal"] or f"exit {crash['returncode']}"
    out = [system, crash["workload"] or "(start)", str(crash["concurrency"]), "-", "CRASHED", how]
    return out + ["-"] * (len(COMPARE_COLUMNS) - len(out))


def crash_lines(crashed: dict[str, dict[str, Any]], indent: str = "") -> list[str]:
    lines = []
    for name, c in crashed.items():
        at = f"{c['workload']} c={c['concurrency']}" if c["workload"] else f"c={c['concurrency']}"
        lines.append(f"{indent}crashed {name}: {c['process']} {c['exit']} during {c['phase']} ({at}); "
                     f"last lines of its log ({c['log']}):")
        lines += [f"{indent}    {line}" for line in c["log_tail"][-10:]] or [f"{indent}    (empty)"]
    return lines


def rows_cells(rows: list[Result], crashed: dict[str, dict[str, Any]] | None) -> list[list[str]]:
    return [compare_cells(r) for r in rows] + [crash_cells(k, c) for k, c in (crashed or {}).items()]


def ratios(rows: list[Result]) -> dict[str, float]:
    """Each tokenmill row (any dtype) over each peer's row of the same workload and concurrency: output tok/s and
    prompt tok/s (higher is better), TTFT p50 (lower is better)."""
    by = {(r.system, r.workload, r.concurrency): r for r in rows}
    ours = [r for r in rows if r.system.partition(":")[0] == "tokenmill"]
    peers = list(dict.fromkeys(r.system for r in rows if r.system.partition(":")[0] != "tokenmill"))
    out: dict[str, float] = {}
    for r in ours:
        for peer in peers:
            p = by.get((peer, r.workload, r.concurrency))
            if p is None:
                continue
            at = f"{r.workload} c={r.concurrency}"
            for metric, ours_v, peer_v in (("tok/s", r.output_tok_s, p.output_tok_s),
                                           ("prompt tok/s", r.extra.get("prompt_tok_s"), p.extra.get("prompt_tok_s")),
                                           ("TTFT p50", r.ttft_p50_s, p.ttft_p50_s)):
                if ours_v and peer_v:
                    out[f"{r.system}/{peer} {metric} {at}"] = ours_v / peer_v
    return out


def plot(rows: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    systems = list(dict.fromkeys(r.system for r in rows))
    concs = sorted({r.concurrency for r in rows})
    fig, axes = plt.subplots(2, max(1, len(workloads)), figsize=(6 * max(1, len(workloads)), 8), squeeze=False)
    width = 0.8 / max(1, len(systems))
    for col, wl in enumerate(workloads):
        for metric, ax, label in ((lambda r: r.output_tok_s, axes[0][col], "output tokens/s"),
                                  (lambda r: r.ttft_p50_s, axes[1][col], "TTFT p50 (s)")):
            for k, sysname in enumerate(systems):
                vals = [next((metric(r) for r in rows if r.system == sysname and r.workload == wl
                              and r.concurrency == c), 0.0) for c in concs]
                ax.bar([i + k * width for i in range(len(concs))], vals, width, label=sysname)
            ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(concs))], [f"c={c}" for c in concs])
            ax.set_ylabel(label)
            ax.set_title(f"{wl}: {label}")
            ax.grid(axis="y", alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Outcome:
    """What became of each system besides its rows: skipped (absent), failed (an error), crashed (its server process
    died: Crashed.record), and what each peer is (System.describe: llama.cpp's binary and build flags)."""

    skipped: dict[str, str]
    failed: dict[str, str]
    crashed: dict[str, dict[str, Any]]
    peers: dict[str, dict[str, Any]]


def write_report(opts: Options, works: dict[str, Work], rows: list[Result], outcome: Outcome,
                 total_s: float) -> dict[str, Any]:
    """compare.{json,md,png} as they stand: written after every system, so a long run that dies keeps its rows."""
    skipped, failed, crashed = outcome.skipped, outcome.failed, outcome.crashed
    report = {
        "benchmark": "compare", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["tokenmill bench compare", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "compare"]
        else " ".join(sys.argv),
        "options": options_record(opts),
        "environment": environment(),
        "workloads": {w.name: {"prompts": len(w.prompts), "prompt_tokens": sum(map(len, w.prompt_ids)),
                               "prompt_tokens_mean": sum(map(len, w.prompt_ids)) / max(1, len(w.prompt_ids)),
                               "max_tokens_sum": sum(w.max_tokens), "ignore_eos": w.ignore_eos,
                               "fresh_prompts_per_concurrency": w.fresh, "source": w.source or None}
                      for w in works.values()},
        "total_s": total_s, "skipped": skipped, "failed": failed, "crashed": crashed, "peers": outcome.peers,
        "results": [asdict(r) for r in rows], "ratios": ratios(rows),
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / "compare.json").write_text(json.dumps(report, indent=2))
    md = [f"# tokenmill vs peers ({report['date']})", "", f"Command: `{report['command']}`", "",
          markdown_table(COMPARE_COLUMNS, rows_cells(rows, crashed)), ""]
    md += [f"- {k}: {v:.2f}x" for k, v in report["ratios"].items()]
    md += [f"- skipped {k}: {v}" for k, v in skipped.items()] + [f"- failed {k}: {v}" for k, v in failed.items()]
    md += ["", "```", *crash_lines(crashed), "```"] if crashed else []
    (opts.out_dir / "compare.md").write_text("\n".join(md) + "\n")
    if rows:
        plot(rows, opts.out_dir / "compare.png")
    return report


def main(opts: Options) -> dict[str, Any]:
    from services.common.model_loader import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(opts.model)
    works = build_works(tokenizer, opts)
    longest_prompt = max(len(p) for w in works.values() for p in w.prompt_ids)
    page_tokens = longest_prompt + max(opts.max_tokens, opts.fixed_tokens)
    print(f"workloads {list(works)}: {opts.requests} requests ({opts.requests_c1 or opts.requests} at c=1), "
          f"concurrency {opts.concurrency}, systems {opts.systems}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[Result] = []
    outcome = Outcome({}, {}, {}, {})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as logs:
        for name in opts.systems:
            system = make_system(name, opts, Path(logs), page_tokens)
            reason = system.skip_reason()
            if reason:
                outcome.skipped[name] = reason
                print(f"skip {name}: {reason}", flush=True)
                continue
            described = system.describe()
            if described is not None:
                outcome.peers[name] = described
            print(f"{name} ({system.transport}):", flush=True)
            try:
                run_system(system, works, opts, rows)
            except Crashed as exc:
                outcome.crashed[name] = exc.record
                print("\n".join(crash_lines({name: exc.record})), flush=True)
            except Exception as exc:  # one broken peer must not lose the others' results
                outcome.failed[name] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"FAILED {name}: {outcome.failed[name]}", flush=True)
            write_report(opts, works, rows, outcome, time.perf_counter() - t0)
    report = write_report(opts, works, rows, outcome, time.perf_counter() - t0)
    print()
    print(table(COMPARE_COLUMNS, rows_cells(rows, outcome.crashed)))
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}x")
    for k, v in outcome.skipped.items():
        print(f"skipped {k}: {v}")
    for k, v in outcome.failed.items():
        print(f"failed {k}: {v}")
    print("\n".join(crash_lines(outcome.crashed)))
    print(f"wrote {opts.out_dir / 'compare.json'}, compare.md, compare.png")
    return report
