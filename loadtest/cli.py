"""`tokenmill loadtest` / `python -m loadtest`: run Locust headless against a gateway, then write the report.

Locust runs as a subprocess (gevent monkey-patches its process; that must not leak into this one).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from bench.harness import free_port

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
ROOT = LOCUSTFILE.parents[1]


def locust_command(*, host: str, users: int, spawn_rate: float, run_time: str, out: Path, user_class: str,
                   max_tokens: int, temperature: float, ignore_eos: bool, stream_ratio: float, wait_min: float,
                   wait_max: float, request_timeout: float, prompt_seed: int, model_name: str, stop_timeout: float,
                   verbose: bool, extra: list[str]) -> list[str]:
    prefix = out / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--host", host,
           "--csv", str(prefix), "--html", str(out / "locust.html"), "--exit-code-on-error", "0",
           "--stop-timeout", f"{stop_timeout:g}",
           "--max-tokens", str(max_tokens), "--temperature", f"{temperature:g}", "--stream-ratio", f"{stream_ratio:g}",
           "--wait-min", f"{wait_min:g}", "--wait-max", f"{wait_max:g}", "--request-timeout", f"{request_timeout:g}",
           "--prompt-seed", str(prompt_seed), "--requests-csv", f"{prefix}_requests.csv"]
    if ignore_eos:
        cmd.append("--ignore-eos")
    if model_name:
        cmd += ["--model-name", model_name]
    if not verbose:
        cmd.append("--only-summary")
    return [*cmd, *extra, user_class]


def run_locust(cmd: list[str], out: Path, api_key: str = "") -> int:
    """Run Locust, echo its output and keep it in out/locust.log; Ctrl-C / SIGTERM stop it cleanly (CSVs kept)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}
    if api_key:
        env["TOKENMILL_API_KEY"] = api_key  # the locustfile reads it; kept off the command line
    # cwd = out: Locust reads locust.conf / pyproject.toml from its working directory; ours must not apply.
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with (out / "locust.log").open("w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                typer.echo(line, nl=False)
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _invocation(params: dict) -> str:
    """This run's command line as `tokenmill loadtest ...`: the options that differ from their defaults."""
    import inspect

    args = []
    for name, param in inspect.signature(loadtest).parameters.items():
        value, default = params.get(name), getattr(param.default, "default", param.default)
        if name == "api_key" or value == default or value in (None, [], ()):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            for v in value if isinstance(value, list | tuple) else [value]:
                v = f"{v:g}" if isinstance(v, float) else str(v)
                args += [f"{flag}={v}"] if v.startswith("-") else [flag, v]
    return shlex.join(["tokenmill", "loadtest", *args])


def loadtest(
    host: str = typer.Option("127.0.0.1:50051", envvar="TOKENMILL_GATEWAY",
                             help="Gateway gRPC address host:port (with --http: the HTTP base URL)."),
    users: int = typer.Option(8, help="Concurrent users (Locust -u)."),
    spawn_rate: float = typer.Option(2.0, help="Users started per second (Locust -r)."),
    run_time: str = typer.Option("1m", help="Test length, Locust style: 20s, 5m, 1h, 1h30m."),
    out: Path = typer.Option(None, help="Results folder (created if missing); default results/loadtest/<time>."),
    up: bool = typer.Option(False, help="Start a local suite (worker(s) + gateway on free ports) for the test."),
    workers: int = typer.Option(1, help="--up: worker processes."),
    engine: str = typer.Option(None, help="--up: worker engine (default: the worker's own default)."),
    model: str = typer.Option(None, help="--up: model (default: the embedded smollm2-135m)."),
    worker_arg: list[str] = typer.Option(None, help="--up: extra worker flag, repeatable: --worker-arg=--max-num-seqs "
                                                    "--worker-arg=8."),
    http: bool = typer.Option(False, help="Use the OpenAI-compatible HTTP user (tokenmill's HTTP front, vLLM, "
                                          "llama.cpp's server) instead of gRPC."),
    max_tokens: int = typer.Option(256, help="max_tokens of every request."),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 = greedy."),
    ignore_eos: bool = typer.Option(False, help="Always generate max_tokens tokens."),
    stream_ratio: float = typer.Option(0.5, help="Share of requests that stream; the rest are unary."),
    wait_min: float = typer.Option(0.0, help="Least think time between one user's requests, s."),
    wait_max: float = typer.Option(0.0, help="Most think time between one user's requests, s."),
    request_timeout: float = typer.Option(600.0, help="Deadline of one request, s."),
    prompt_seed: int = typer.Option(0, help="Seed of the prompt order (the 1,500-prompt story set)."),
    model_name: str = typer.Option("", help="Model field of requests (default: the served model)."),
    api_key: str = typer.Option("", envvar="TOKENMILL_API_KEY", help="API key, if the server needs one."),
    stop_timeout: float = typer.Option(0.0, help="At the end, let in-flight requests finish for up to this long, s "
                                                 "(0: stop at once; unfinished requests are not counted)."),
    verbose: bool = typer.Option(False, help="Print Locust's stats table every few seconds."),
    progress_interval: float = typer.Option(60.0, help="Print one progress line this often, s (0 = never)."),
    locust_arg: list[str] = typer.Option(None, help="Extra Locust argument, repeatable."),
) -> None:
    """Run a Locust load test (gRPC or OpenAI HTTP) and write a report: Markdown, HTML, JSON, CSVs, PNG plots."""
    invocation = _invocation(dict(locals()))
    out = (out or Path("results") / "loadtest" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    services = []

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (a Job's deadline, `kill`) must still stop a suite started with --up, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        if up:
            from services.local import start_suite

            gw_port, http_port = free_port(), (free_port() if http else 0)
            typer.echo(f"starting {workers} worker(s) and a gateway (logs in {out / 'logs'}) ...")
            t0 = time.monotonic()
            services = start_suite(workers=workers, engine=engine, model=model, gateway_port=gw_port,
                                   worker_port=free_port(), http_port=http_port, judge=False,
                                   log_dir=out / "logs", extra_worker_args=list(worker_arg or []))
            typer.echo(f"suite SERVING after {time.monotonic() - t0:.0f}s")
            host = f"http://127.0.0.1:{http_port}" if http else f"127.0.0.1:{gw_port}"
        elif http and not host.startswith(("http://", "https://")):
            host = "http://" + host
        cmd = locust_command(host=host, users=users, spawn_rate=spawn_rate, run_time=run_time, out=out,
                             user_class="OpenAIUser" if http else "GrpcUser", max_tokens=max_tokens,
                             temperature=temperature, ignore_eos=ignore_eos, stream_ratio=stream_ratio,
                             wait_min=wait_min, wait_max=wait_max, request_timeout=request_timeout,
                             prompt_seed=prompt_seed, model_name=model_name, stop_timeout=stop_timeout,
                             verbose=verbose, extra=["--progress-interval", f"{progress_interval:g}",
                                                     *(locust_arg or [])])
        (out / "command.txt").write_text(f"{invocation}\n{shlex.join(cmd)}\n")
        typer.echo(f"locust: {users} users, {spawn_rate:g}/s, {run_time}, against {host}; results in {out}")
        rc = run_locust(cmd, out, api_key)
    finally:
        if services:
            from services.local import stop_all

            typer.echo("stopping the local suite ...")
            stop_all(services)
        signal.signal(signal.SIGTERM, previous)

    if not (out / "locust_requests.csv").exists():
        typer.echo(f"error: Locust wrote no per-request CSV (exit code {rc}); see {out / 'locust.log'}", err=True)
        raise typer.Exit(rc or 1)
    from loadtest.report import write_report

    summary = write_report(out)
    typer.echo("\n" + (out / "report.md").read_text())
    typer.echo(f"report: {out / 'report.md'}, {out / 'report.html'} (plots and CSVs alongside)")
    if rc != 0:
        raise typer.Exit(rc)
    if summary["ok"] == 0:
        typer.echo(f"error: no request succeeded ({summary['requests']} finished)", err=True)
        raise typer.Exit(1)


def main() -> None:
    typer.run(loadtest)
