"""Local runs: `tokenmill up` (the whole suite as processes on 127.0.0.1) and `tokenmill generate` (a client)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer

DEMO_PROMPT = ("Write a single paragraph moral story for children about a curious fox who learns the value "
               "of honesty in a quiet forest.")
# Settings a story reads well with on a small model: greedy decoding loops, plain sampling wanders; a mild
# repetition penalty keeps the 135M model from repeating its sentences (issue 25).
DEMO_SAMPLING = {"max_tokens": 160, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 7}


@dataclass
class Service:
    name: str
    address: str
    proc: subprocess.Popen
    log: Path


def launch(name: str, args: list[str], address: str, log_dir: Path, cwd: Path | None = None) -> Service:
    """Start `tokenmill <args>` as a process logging to log_dir/<name>.log (not yet waited for); `cwd`: run the
    services of that source tree (e.g. a git worktree of another commit) instead of this one."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cwd is not None:
        env["PYTHONPATH"] = str(cwd)
    with path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=cwd)
    return Service(name, address, proc, path)


def open_channel(address: str, credentials=None, options=()):
    """A blocking channel to a service: TLS with `credentials` (grpc.ChannelCredentials), else plaintext."""
    import grpc

    if credentials:
        return grpc.secure_channel(address, credentials, options=list(options))
    return grpc.insecure_channel(address, options=list(options))


def wait_serving(services: list[Service], timeout_s: float, credentials=None) -> None:
    """Block until every service's grpc.health.v1 says SERVING; raise with its log tail if one dies."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    pending = list(services)
    while pending:
        for svc in list(pending):
            if svc.proc.poll() is not None:
                tail = svc.log.read_text()[-3000:]
                raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode}; its log ({svc.log}):\n{tail}")
            with open_channel(svc.address, credentials) as channel:
                try:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.remove(svc)
                except grpc.RpcError:
                    pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not SERVING after {timeout_s:.0f}s: {', '.join(s.name for s in pending)}")
        time.sleep(0.3)


def stop_all(services: list[Service], grace_s: float = 15.0) -> None:
    for svc in services:
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for svc in services:
        try:
            svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()


def start_suite(*, workers: int = 1, engine: str | None = None, model: str | None = None,
                gateway_port: int = 50051, worker_port: int = 50061, judge_port: int = 50071, http_port: int = 0,
                judge: bool = True, log_dir: Path | None = None, extra_worker_args: list[str] | None = None,
                timeout_s: float = 300.0, judge_sample_rate: float = 0.0) -> list[Service]:
    """Start workers, gateway (and judge) as processes; return once all are SERVING. With the judge and a
    `judge_sample_rate`, the gateway sends that share of completed requests to it (live quality)."""
    from services.common.config import cache_dir

    log_dir = log_dir or cache_dir() / "logs"
    services: list[Service] = []
    try:
        addrs = []
        for i in range(workers):
            port = worker_port + i
            args = ["worker", "--port", str(port), "--worker-id", f"worker-{i}", *(extra_worker_args or [])]
            if engine:
                args += ["--engine", engine]
            if model:
                args += ["--model", model]
            addrs.append(f"127.0.0.1:{port}")
            services.append(launch(f"worker-{i}", args, addrs[-1], log_dir))
        gw_args = ["gateway", "--port", str(gateway_port), "--workers", ",".join(addrs), "--workers-dns", ""]
        if http_port:
            gw_args += ["--http-port", str(http_port)]
        if judge and judge_sample_rate > 0:
            gw_args += ["--judge-address", f"127.0.0.1:{judge_port}", "--judge-sample-rate", str(judge_sample_rate)]
        services.append(launch("gateway", gw_args, f"127.0.0.1:{gateway_port}", log_dir))
        if judge:
            j_args = ["judge", "--port", str(judge_port)] + (["--model", model] if model else [])
            services.append(launch("judge", j_args, f"127.0.0.1:{judge_port}", log_dir))
        wait_serving(services, timeout_s)
        return services
    except BaseException:
        stop_all(services)
        raise


def up(
    workers: int = typer.Option(1, help="Worker processes to start."),
    engine: str = typer.Option(None, help="Worker engine (default: the worker's own default)."),
    model: str = typer.Option(None, help="Model for workers and judge (default: the embedded smollm2-135m)."),
    gateway_port: int = typer.Option(50051, help="Gateway gRPC port."),
    http_port: int = typer.Option(8000, help="Gateway OpenAI-compatible HTTP port; 0 = off."),
    worker_port: int = typer.Option(50061, help="First worker's port; worker i uses this + i."),
    judge_port: int = typer.Option(50071, help="Judge gRPC port."),
    judge: bool = typer.Option(True, help="Start the judge too."),
    demo: bool = typer.Option(False, help="Send one story request through the suite, judge it, print both, exit."),
    judge_sample_rate: float = typer.Option(0.1, help="Live quality: share of completed requests the gateway sends "
                                            "to the judge (tokenmill:quality_score on its /metrics); 0 = off. "
                                            "--demo samples every request."),
) -> None:
    """Start worker(s), gateway and judge on 127.0.0.1; stop them all on Ctrl-C."""
    typer.echo(f"starting {workers} worker(s), gateway{' and judge' if judge else ''} ...")
    t0 = time.monotonic()
    services = start_suite(workers=workers, engine=engine, model=model, gateway_port=gateway_port,
                           worker_port=worker_port, judge_port=judge_port, http_port=http_port, judge=judge,
                           judge_sample_rate=1.0 if demo and judge_sample_rate > 0 else judge_sample_rate)
    try:
        typer.echo(f"all SERVING after {time.monotonic() - t0:.1f}s")
        for svc in services:
            typer.echo(f"  {svc.name:10s} grpc://{svc.address}   log: {svc.log}")
            if svc.name.startswith("worker"):
                typer.echo(f"  {'':10s} {describe_worker(svc.address)}")
        if http_port:
            typer.echo(f"  {'http':10s} http://127.0.0.1:{http_port}/v1 (OpenAI-compatible)")
        if judge and judge_sample_rate > 0 and http_port:
            share = "every completed request" if demo else f"{judge_sample_rate:.0%} of completed requests"
            typer.echo(f"  live quality: {share} judged; tokenmill:quality_score at "
                       f"http://127.0.0.1:{http_port}/metrics")
        if demo:
            run_demo(f"127.0.0.1:{gateway_port}", f"127.0.0.1:{judge_port}" if judge else None)
            if judge and judge_sample_rate > 0 and http_port:
                show_live_quality(f"http://127.0.0.1:{http_port}/metrics")
            return
        typer.echo("Ctrl-C stops them all.")
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # delivered to sigwait, not as an exit
        signal.sigwait(stop_signals)
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("stopping ...")
        stop_all(services)


WEIGHTS = {"gguf": "4-bit: the GGUF's own Q4_1 blocks (Q8_0 embedding / LM head)", "none": "float (unquantized)",
           "int8": "int8 per channel", "int4": "int4 in groups (8-bit LM head)", "nf4": "NF4 (8-bit LM head)"}


def describe_worker(address: str) -> str:
    """What a worker serves, from its Info RPC: model, engine, forward, weight format, device."""

    from services.common.pb import worker_pb2, worker_pb2_grpc

    with open_channel(address) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
    weights = WEIGHTS.get(info.quantization, info.quantization)
    return (f"{info.model}: {info.engine} engine, {info.model_impl} forward, weights {weights}, "
            f"{info.device} {info.dtype}")


def show_live_quality(url: str, timeout_s: float = 600.0) -> None:
    """Wait for the gateway's live-quality sample of the demo request to be judged; print its histogram sums."""
    import httpx

    from services.common.metrics import sample_sum

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if sample_sum(text, "tokenmill:quality_judged_total") + sample_sum(text, "tokenmill:quality_errors_total"):
            break
        time.sleep(1.0)
    else:
        typer.echo("\nlive quality: the judge has not answered the gateway's sample yet")
        return
    typer.echo("\nlive quality (the gateway's own sample of that request, from its /metrics):")
    for line in text.splitlines():
        if line.startswith("tokenmill:quality_score_sum") or \
                (line.startswith("tokenmill:quality_errors_total") and float(line.rsplit(" ", 1)[1])):
            typer.echo(f"  {line}")


def run_demo(gateway: str, judge: str | None, **sampling: float) -> str:
    """Stream the demo story through the gateway (DEMO_SAMPLING, updated by `sampling`), print it, its settings
    and (with a judge) its scores; return the story."""
    import grpc

    from services.common.pb import inference_pb2, inference_pb2_grpc

    settings = {**DEMO_SAMPLING, **sampling}
    typer.echo(f"\nprompt: {DEMO_PROMPT}")
    typer.echo("sampling: " + ", ".join(f"{k} {v:g}" for k, v in settings.items()) + "\n")
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            messages=[inference_pb2.ChatMessage(role="user", content=DEMO_PROMPT)],
            sampling=inference_pb2.SamplingParams(**settings))
        text = []
        for chunk in stub.GenerateStream(request, timeout=300):
            text.append(chunk.text)
            typer.echo(chunk.text, nl=False)
            if chunk.finish_reason:
                last = chunk
    t, u = last.timing, last.usage
    typer.echo(f"\n\n[{u.completion_tokens} tokens, finish={inference_pb2.FinishReason.Name(last.finish_reason)}, "
               f"ttft {t.ttft_ms:.0f} ms, total {t.total_ms:.0f} ms, worker {t.worker}, batch {t.batch_size}]")
    if judge:
        from services.judge.client import score_text

        typer.echo("\njudge (children-story rubric):")
        typer.echo(score_text(judge, DEMO_PROMPT, "".join(text)))
    return "".join(text)


def generate(
    prompt: str = typer.Argument(..., help="Prompt text (or the user message with --chat)."),
    chat: bool = typer.Option(False, help="Send as a chat message (the chat template is applied)."),
    stream: bool = typer.Option(False, help="Print tokens as they arrive."),
    max_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(None, help="Sampling seed."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens; 0 = off."),
    min_p: float = typer.Option(0.0, help="Drop tokens below min_p x the most likely one's probability."),
    presence_penalty: float = typer.Option(0.0, help="-2..2 (OpenAI), over generated tokens."),
    frequency_penalty: float = typer.Option(0.0, help="-2..2 (OpenAI), over generated tokens."),
    repetition_penalty: float = typer.Option(1.0, help="> 0, 1 = off (transformers'), over prompt + output."),
    min_tokens: int = typer.Option(0, help="EOS is masked until this many tokens."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    bad_words: list[str] = typer.Option([], "--bad-word", help="A word never generated (repeatable)."),
    logit_bias: list[str] = typer.Option([], help="TOKEN_ID=BIAS, -100..100 (repeatable)."),
    n: int = typer.Option(1, help="Choices returned (sampled in parallel over the prompt's KV blocks)."),
    best_of: int = typer.Option(0, help="Samples generated, the n most likely returned; 0 = n."),
    gateway: str = typer.Option("127.0.0.1:50051", envvar="TOKENMILL_GATEWAY", help="Gateway address."),
    api_key: str = typer.Option("", envvar="TOKENMILL_API_KEY", help="API key, if the gateway needs one."),
    tls_ca: str = typer.Option("", envvar="TOKENMILL_TLS_CA", help="PEM CA of the gateway's certificate: connect "
                               "over TLS (for a gateway run with --tls-cert)."),
) -> None:
    """Send one request to the gateway and print the completion."""
    import grpc

    from services.common.pb import inference_pb2, inference_pb2_grpc
    from services.common.tls import channel_credentials

    try:
        bias = {int(k): float(v) for k, v in (item.split("=", 1) for item in logit_bias)}
    except ValueError:
        raise typer.BadParameter(f"--logit-bias takes TOKEN_ID=BIAS, got {logit_bias}") from None
    sampling = inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty, min_tokens=min_tokens, stop=stop, bad_words=bad_words,
        logit_bias=bias, n=n, best_of=best_of)
    if seed is not None:
        sampling.seed = seed
    request = inference_pb2.GenerateRequest(sampling=sampling)
    if chat:
        request.messages.append(inference_pb2.ChatMessage(role="user", content=prompt))
    else:
        request.prompt = prompt
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    with open_channel(gateway, channel_credentials(tls_ca)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            if stream:
                for chunk in stub.GenerateStream(request, metadata=metadata, timeout=600):
                    typer.echo(chunk.text if n == 1 else f"[{chunk.index}] {chunk.text}\n" if chunk.text else "",
                               nl=False)
                typer.echo()
            else:
                reply = stub.Generate(request, metadata=metadata, timeout=600)
                for choice in reply.choices if n > 1 else [reply]:
                    typer.echo(f"[{choice.index}] {choice.text}" if n > 1 else choice.text)
        except grpc.RpcError as exc:
            typer.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
            raise typer.Exit(1) from None
