"""`tokenmill k8s ...`: run a benchmark / load test / eval as a Kubernetes Job, show the deployment.

Imports stay light: the `kubernetes` client is imported inside the commands.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import typer

from services.k8s.jobs import BENCH_PHASES, OVERLAYS

app = typer.Typer(help="tokenmill on Kubernetes: run phase benchmarks, load tests and evals as Jobs; status.",
                  no_args_is_help=True)


@app.command("run-job")
def run_job(
    target: str = typer.Argument(..., help=f"A bench phase ({', '.join(BENCH_PHASES)}), all, loadtest or eval."),
    namespace: str = typer.Option("tokenmill", "--namespace", "-n", help="Namespace where tokenmill is deployed."),
    overlay: str = typer.Option("gpu", help=f"Which Jobs: {' | '.join(OVERLAYS)} (k8s/jobs or k8s/jobs/cpu)."),
    image: str = typer.Option(None, help="Image for the Job's containers (default: as in the manifests)."),
    arg: list[str] = typer.Option(None, "--arg",
                                  help="Extra argument for the command; repeat (--arg=--users --arg=32)."),
    out: Path = typer.Option(Path("results/k8s"), help="Local folder for the copied-out results."),
    jobs_dir: Path = typer.Option(None, help="The k8s/jobs folder (default: this checkout's)."),
    timeout_s: float = typer.Option(6 * 3600, help="Give up waiting after this long (the Job keeps running)."),
    context: str = typer.Option(None, help="kubeconfig context (default: the current one)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the Job as YAML and exit; talks to no cluster."),
) -> None:
    """Create the Job from k8s/jobs, follow its pod's log, wait for it, copy its results out."""
    from services.k8s.jobs import build_job, to_yaml
    from services.k8s.launcher import Launcher, LaunchError, api_client

    run_id = time.strftime("%m%d%H%M") + "-" + secrets.token_hex(2)
    try:
        job, pvcs = build_job(target, overlay=overlay, jobs_dir=jobs_dir, namespace=namespace, run_id=run_id,
                              image=image, extra_args=arg or ())
    except (ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if dry_run:
        typer.echo(to_yaml(job), nl=False)
        return
    try:
        launcher = Launcher(api_client(context), namespace, echo=typer.echo)
        result = launcher.run(job, pvcs, out, timeout_s=timeout_s)
    except LaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if not result.succeeded:
        typer.echo(f"logs: kubectl -n {namespace} logs job/{result.name} -c run", err=True)
        raise typer.Exit(1)


@app.command("status")
def status(
    namespace: str = typer.Option("tokenmill", "--namespace", "-n", help="Namespace where tokenmill is deployed."),
    context: str = typer.Option(None, help="kubeconfig context (default: the current one)."),
) -> None:
    """Pods and their readiness, the autoscaler, the gateway's queue depth and each worker's queue."""
    from services.k8s.launcher import Launcher, LaunchError, api_client, format_status

    try:
        launcher = Launcher(api_client(context), namespace, echo=typer.echo)
        typer.echo(format_status(launcher.status()))
    except LaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
