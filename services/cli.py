"""The `tokenmill` command line. Each service module owns its own command; this file only wires them."""

from __future__ import annotations

import typer

from services.common.config import GatewayConfig, WorkerConfig, markdown_table, typer_command

app = typer.Typer(help="tokenmill: an LLM serving suite over gRPC.", no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]}, pretty_exceptions_enable=False)


def _run_worker(config: WorkerConfig) -> None:
    from services.worker.server import run

    run(config)


def _run_gateway(config: GatewayConfig) -> None:
    from services.gateway.main import run

    run(config)


app.command("worker", help="Run one worker (engine + model) as a gRPC server.")(
    typer_command(WorkerConfig, "worker", _run_worker))
app.command("gateway", help="Run the gateway: public gRPC API, queue, batching, routing.")(
    typer_command(GatewayConfig, "gateway", _run_gateway))


@app.command("config")
def config_table() -> None:
    """Print every setting: flag, environment variable, default (the README's table)."""
    typer.echo(markdown_table())


def _register_commands() -> None:
    """Commands owned by other modules (each keeps its heavy imports inside the command)."""
    from bench.cli import app as bench_app
    from loadtest.cli import loadtest
    from services.healthcheck import health
    from services.judge.cli import app as judge_app
    from services.judge.eval import eval_command
    from services.k8s.cli import app as k8s_app
    from services.local import generate, up

    app.command("up")(up)
    app.command("generate")(generate)
    app.command("health")(health)
    app.command("eval")(eval_command)
    app.command("loadtest")(loadtest)
    app.add_typer(judge_app, name="judge", help="Run the judge (default), or calibrate / report / compare.")
    app.add_typer(bench_app, name="bench", help="Benchmarks: the engine, phases 1-8, the peer comparison.")
    app.add_typer(k8s_app, name="k8s", help="Run benchmark / load-test / eval Jobs on a cluster; deployment status.")


_register_commands()

if __name__ == "__main__":
    app()
