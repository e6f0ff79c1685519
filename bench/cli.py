"""`tokenmill bench ...`: benchmark commands (registered under the main CLI as `bench`)."""

from __future__ import annotations

from pathlib import Path

import typer

from bench.compare import WORKLOADS
from bench.systems import SYSTEMS

app = typer.Typer(help="Benchmarks that write JSON under results/.", no_args_is_help=True)


@app.callback()
def bench() -> None:
    """Benchmarks that write JSON under results/ and print a table."""


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@app.command("engine")
def engine(
    quick: bool = typer.Option(False, "--quick", help="Small version: 8 requests, concurrency 1,4, 8..32 tokens."),
    requests: int = typer.Option(128, help="Requests per run (story prompt set, chat template)."),
    concurrency: str = typer.Option("1,8,32", help="Closed-loop client counts, comma separated."),
    engines: str = typer.Option("hf-static,paged,paged:transformers", help="Engines to compare, as system specs: "
                                "paged+ngram / paged+draft = that speculative decoding mode; paged:transformers = "
                                "transformers' modules; :none / :gguf / :int8 ... = a weight format; :bfloat16 = a "
                                "dtype."),
    workload: str = typer.Option("story", help="story (story prompts) | repeat (rewrite a paragraph keeping "
                                 "its words: the answer repeats the prompt)."),
    spec_max_batch: int = typer.Option(-1, help="paged+<mode>: --speculative-max-batch; -1 = worker default."),
    modes: str = typer.Option("direct,grpc", help="direct (AsyncEngine in-process) and/or grpc (gateway+worker)."),
    min_tokens: int = typer.Option(32, help="Smallest max_tokens drawn per request."),
    max_tokens: int = typer.Option(256, help="Largest max_tokens drawn per request."),
    seed: int = typer.Option(0, help="Seed of the prompt sample and the max_tokens draws."),
    model: str = typer.Option("smollm2-135m", help="Model to serve."),
    kv_cache_memory: str = typer.Option("", help="Paged KV pool (bytes or fraction); empty = worker default."),
    threads: int = typer.Option(0, help="torch threads; 0 = default."),
    out: Path = typer.Option(Path("results/engine.json"), help="JSON result file."),
) -> None:
    """hf-static vs paged engine throughput and latency, directly and through gateway + worker over gRPC."""
    from bench.engine import Options, main

    opts = Options(requests=requests, concurrency=_ints(concurrency), engines=_names(engines), modes=_names(modes),
                   min_tokens=min_tokens, max_tokens=max_tokens, seed=seed, model=model,
                   kv_cache_memory=kv_cache_memory, threads=threads, workload=workload,
                   spec_max_batch=spec_max_batch, out=out)
    if quick:
        opts.requests, opts.concurrency, opts.min_tokens, opts.max_tokens = 8, (1, 4), 8, 32
    main(opts)


@app.command("routing")
def routing(
    quick: bool = typer.Option(False, "--quick", help="Tiny run: 2 workers, 4 chats of 2-3 turns, 4 + 4 single turns."),
    workers: int = typer.Option(3, help="Paged workers (threads split between them)."),
    modes: str = typer.Option("least-loaded,prefix-aware", help="Routing modes, each on a fresh fleet."),
    phases: str = typer.Option("multiturn,system,uniform", help="Workloads, in this order, on each fleet."),
    conversations: int = typer.Option(24, help="Multi-turn chats."),
    min_turns: int = typer.Option(4, help="Fewest user turns per chat."),
    max_turns: int = typer.Option(8, help="Most user turns per chat."),
    system_prompts: int = typer.Option(3, help="Long system prompts shared by the system phase's requests."),
    system_requests: int = typer.Option(48, help="Single-turn requests under those system prompts."),
    clients: int = typer.Option(8, help="Closed-loop clients."),
    max_tokens: int = typer.Option(48, help="max_tokens of each chat turn (greedy)."),
    uniform_requests: int = typer.Option(48, help="Distinct single-turn requests of the balance phase."),
    single_max_tokens: int = typer.Option(32, help="max_tokens of each system-phase and uniform request."),
    kv_cache_memory: str = typer.Option("256MiB", help="KV pool of each worker."),
    threads: int = typer.Option(0, help="torch threads per worker; 0 = CPUs / workers."),
    session_ids: bool = typer.Option(False, help="Send each chat's id as session_id."),
    seed: int = typer.Option(0, help="Seed of the chats and prompts."),
    model: str = typer.Option("smollm2-135m", help="Model to serve."),
    out: Path = typer.Option(Path("results/routing.json"), help="JSON result file."),
) -> None:
    """least-loaded vs prefix-aware routing: fleet prefix-cache hit rate, TTFT, throughput, load spread."""
    from bench.routing import Options, main

    opts = Options(workers=workers, modes=_names(modes), phases=_names(phases), conversations=conversations,
                   min_turns=min_turns, max_turns=max_turns, system_prompts=system_prompts,
                   system_requests=system_requests, clients=clients, max_tokens=max_tokens,
                   uniform_requests=uniform_requests, single_max_tokens=single_max_tokens,
                   kv_cache_memory=kv_cache_memory, threads=threads, session_ids=session_ids, seed=seed, model=model,
                   out=out)
    if quick:
        opts.workers, opts.conversations, opts.min_turns, opts.max_turns = 2, 4, 2, 3
        opts.clients, opts.max_tokens, opts.uniform_requests, opts.single_max_tokens = 2, 8, 4, 4
        opts.system_requests = 4
    main(opts)


@app.command("kernels")
def kernels(
    quick: bool = typer.Option(False, "--quick", help="Small version: rows 1,32, 2 weight copies, 2 passes."),
    rows: str = typer.Option("1,2,4,8,16,32,64,256", help="Activation rows (batch tokens), comma separated."),
    copies: int = typer.Option(8, help="Distinct weight matrices per layer shape, called in turn."),
    kernels: str = typer.Option("", help="Kernels, comma separated; empty = all."),
    out: Path = typer.Option(Path("results/kernels.json"), help="JSON result file (and .md beside it)."),
) -> None:
    """Linear-layer kernels on this CPU per shape and batch rows: tokenmill's per format vs PyTorch's, and each one's
    share of the machine's roofs measured in the same run (read bandwidth; fp32, bf16, int8 GEMM)."""
    from bench.kernels import Options, main

    opts = Options(rows=_ints(rows), copies=copies, out=out)
    if kernels:
        opts.kernels = _names(kernels)
    if quick:
        opts.rows, opts.copies, opts.repeat, opts.quick = (1, 32), 2, 2, True
    main(opts)


@app.command("quality")
def quality(
    quick: bool = typer.Option(False, "--quick", help="Smoke test: 1,024 tokens in chunks of 256."),
    tokens: int = typer.Option(20480, help="Tokens of text scored (the prose has about 27k)."),
    chunk: int = typer.Option(512, help="Tokens per forward (non-overlapping chunks)."),
    models: str = typer.Option("smollm2-135m,tiny-qwen2", help="smollm2-135m and/or tiny-qwen2 (random weights)."),
    formats: str = typer.Option("none,gguf,int8,int4,int4/64,nf4", help="Weight formats (int4/64: groups of 64); "
                                "none (fp32) is the reference."),
    threads: int = typer.Option(0, help="torch threads; 0 = default."),
    out: Path = typer.Option(Path("results/quality.json"), help="JSON result file (the .md goes next to it)."),
    activations: str = typer.Option("fp32", help="fp32 and/or int8: rows of the integer-coded formats with the "
                                    "worker's --activations int8 too."),
    kv_cache_dtype: str = typer.Option("auto", help="auto, float16 and/or bfloat16: rows of every format with "
                                       "that worker --kv-cache-dtype too (K/V in such a cache, attended by the "
                                       "engine's C++ kernel)."),
) -> None:
    """Perplexity, KL divergence from fp32 and top-1 agreement per weight format."""
    from bench.quality import Options, main

    names = _names(formats)
    if "none" not in names:
        names = ("none", *names)  # the reference every other format is compared with
    opts = Options(models=_names(models), formats=names, tokens=tokens, chunk=chunk, threads=threads, quick=quick,
                   out=out, activations=_names(activations), kv_cache_dtypes=_names(kv_cache_dtype))
    if quick:
        opts.tokens, opts.chunk = 1024, 256
    main(opts)


@app.command("structured")
def structured(
    batches: str = typer.Option("1,32", help="Batch sizes (concurrent requests), comma separated."),
    max_tokens: int = typer.Option(48, help="max_tokens per request of the engine runs."),
    out: Path = typer.Option(Path("results/structured.json"), help="JSON result file."),
) -> None:
    """Constrained decoding's cost: per-step mask work per library, engine tok/s with and without a JSON schema."""
    from bench.structured import main

    main(_ints(batches), max_tokens, out)


@app.command("sampling")
def sampling(
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 1 round, n = 4 over 200 tokens, 16 tokens each, "
                               "a batch of 8."),
    n: int = typer.Option(8, help="Samples of the parallel-sampling request (and separate requests against it)."),
    prompt_tokens: int = typer.Option(1000, help="Prompt length of the n runs (held-out prose)."),
    max_tokens: int = typer.Option(128, help="Tokens per sample of the n runs."),
    batch: int = typer.Option(32, help="Requests of the penalties batch (story prompts)."),
    batch_max_tokens: int = typer.Option(128, help="Tokens per request of the penalties batch."),
    rounds: int = typer.Option(3, help="Interleaved rounds of every configuration."),
    kv_cache_memory: str = typer.Option("", help="Paged KV pool (bytes or fraction); empty = worker default."),
    threads: int = typer.Option(0, help="torch threads; 0 = default."),
    out: Path = typer.Option(Path("results/sampling.json"), help="JSON result file."),
) -> None:
    """n > 1 vs separate requests (KV blocks held, wall time) and penalties' cost on a batch (tok/s)."""
    from bench.sampling import Options, main

    opts = Options(n=n, prompt_tokens=prompt_tokens, max_tokens=max_tokens, batch=batch,
                   batch_max_tokens=batch_max_tokens, rounds=rounds, kv_cache_memory=kv_cache_memory, threads=threads,
                   out=out)
    if quick:
        opts.rounds, opts.n, opts.prompt_tokens, opts.max_tokens = 1, 4, 200, 16
        opts.batch, opts.batch_max_tokens = 8, 16
    main(opts)


@app.command("activations")
def activations(
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 1 round, a 128-token prompt, 9 new tokens."),
    formats: str = typer.Option("gguf", help="Weight formats with integer codes (gguf, int8, int4, ...)."),
    prompt_len: int = typer.Option(1024, help="Tokens of the prefill prompt."),
    new_tokens: int = typer.Option(33, help="Tokens decoded at batch 1 and 32."),
    repeat: int = typer.Option(3, help="Interleaved rounds; the best counts."),
    threads: int = typer.Option(0, help="torch threads; 0 = default."),
    out: Path = typer.Option(Path("results/activations.json"), help="JSON result file (the .md goes next to it)."),
    kv_cache_dtype: str = typer.Option("auto", help="auto, float16 and/or bfloat16: each configuration with "
                                       "that worker --kv-cache-dtype too."),
) -> None:
    """The worker's --activations fp32 vs int8: prefill and decode speed against the machine's roofs."""
    from bench.activations import Options, main

    opts = Options(formats=_names(formats), prompt_len=prompt_len, new_tokens=new_tokens, repeat=repeat,
                   threads=threads, quick=quick, out=out, kv_cache_dtypes=_names(kv_cache_dtype))
    if quick:
        opts.repeat, opts.prompt_len, opts.new_tokens = 1, 128, 9
    main(opts)


@app.command("compare")
def compare(
    quick: bool = typer.Option(False, "--quick", help="Tiny run: 4 requests, concurrency 1,2, 8..16 tokens."),
    systems: str = typer.Option(",".join(SYSTEMS), help="Systems, comma separated (absent peers are skipped)."),
    concurrency: str = typer.Option("1,8,32", help="Closed-loop client counts, comma separated."),
    requests: int = typer.Option(64, help="Requests per run (story prompt set, chat template)."),
    requests_c1: int = typer.Option(0, help="Requests at concurrency 1; 0 = --requests."),
    workloads: str = typer.Option(",".join(WORKLOADS), help="story (max_tokens drawn), fixed128 (the story "
                                  "prompts, --fixed-tokens each) and/or long (~--long-tokens prompts of "
                                  "stdlib docs + a question, --fixed-tokens each)."),
    min_tokens: int = typer.Option(32, help="story: smallest max_tokens drawn."),
    max_tokens: int = typer.Option(256, help="story: largest max_tokens drawn."),
    fixed_tokens: int = typer.Option(128, help="fixed128 and long: max_tokens of every request (ignore_eos)."),
    long_tokens: int = typer.Option(1000, help="long: prompt tokens aimed at (chat template included)."),
    seed: int = typer.Option(0, help="Seed of the prompt sample and max_tokens draws."),
    model: str = typer.Option("smollm2-135m", help="Model served by every system."),
    threads: int = typer.Option(0, help="Threads per system; 0 = each system's default."),
    dtype: str = typer.Option("auto", help="dtype of every PyTorch system (same for all): auto | float32 | "
                              "bfloat16; llama.cpp always runs the GGUF's own 4-bit weights."),
    llama_server: str = typer.Option("", help="llama-server binary; default <peers cache>/llama-server."),
    out_dir: Path = typer.Option(Path("results"), help="Folder for compare.json/.md/.png."),
) -> None:
    """tokenmill vs hf-static vs transformers CB vs llama.cpp (vs vLLM): tok/s, req/h, TTFT, latency, RSS."""
    from bench.compare import Options, main

    opts = Options(systems=_names(systems), concurrency=_ints(concurrency), requests=requests,
                   requests_c1=requests_c1, workloads=_names(workloads), min_tokens=min_tokens,
                   max_tokens=max_tokens, fixed_tokens=fixed_tokens, long_tokens=long_tokens, seed=seed,
                   model=model, threads=threads, dtype=dtype, llama_server=llama_server, out_dir=out_dir)
    if quick:
        opts.requests, opts.requests_c1, opts.concurrency = 4, 0, (1, 2)
        opts.min_tokens, opts.max_tokens, opts.fixed_tokens, opts.long_tokens = 8, 16, 16, 256
    main(opts)


@app.command("observability")
def observability(
    requests: int = typer.Option(24, help="Requests per configuration and round (story prompt set)."),
    concurrency: int = typer.Option(8, help="Closed-loop clients."),
    min_tokens: int = typer.Option(32, help="Smallest max_tokens drawn per request."),
    max_tokens: int = typer.Option(128, help="Largest max_tokens drawn per request."),
    rounds: int = typer.Option(2, help="Interleaved rounds of every configuration."),
    configs: str = typer.Option("off,tracing,quality", help="comma separated: off, tracing, quality"),
    sample_rate: float = typer.Option(0.1, help="live quality's --judge-sample-rate"),
    judge_running: bool = typer.Option(False, "--judge-running", help="quality: let the judge (on these cores) "
                                       "score during the timed run instead of pausing it"),
    before: Path = typer.Option(None, help="a source tree to run as the 'before' configuration"),
    tree: Path = typer.Option(None, help="run the other configurations' services from this source tree"),
    threads: int = typer.Option(0, help="worker --threads; 0 = its default"),
    note: list[str] = typer.Option(None, help="a line for the JSON's notes (the machine's state); repeatable"),
    out: Path = typer.Option(Path("results/observability.json"), help="JSON result file."),
) -> None:
    """What observability costs: throughput and CPU per request / token through gateway + worker with tracing and
    live quality off and on."""
    from bench.observability import Options, main

    main(Options(requests=requests, concurrency=concurrency, min_tokens=min_tokens, max_tokens=max_tokens,
                 rounds=rounds, configs=tuple(configs.split(",")), sample_rate=sample_rate,
                 judge_running=judge_running, before=before, tree=tree, threads=threads, out=out,
                 notes=list(note or [])))


from bench.phases import register; register(app)  # noqa: E402, E702, I001  phases 1-8 (bench/phases)

if __name__ == "__main__":
    app()
