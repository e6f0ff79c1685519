"""`tokenmill health ADDRESS`: exit 0 when a service's grpc.health.v1 says SERVING (1 otherwise).

Kubernetes' native gRPC probes speak plaintext only; a pod serving TLS (k8s/components/tls) probes itself
with this command instead, over TLS, with its own certificate where the server wants a client's.
"""

from __future__ import annotations

import typer


def health(
    address: str = typer.Argument(..., help="host:port of a tokenmill server."),
    tls_ca: str = typer.Option("", envvar="TOKENMILL_TLS_CA", help="PEM CA of the server's certificate: use TLS."),
    tls_cert: str = typer.Option("", help="PEM client certificate (for a server that requires one)."),
    tls_key: str = typer.Option("", help="PEM key of --tls-cert."),
    tls_server_name: str = typer.Option("", help="Name the server's certificate is issued for, if not the address."),
    timeout_s: float = typer.Option(3.0, help="Seconds to wait for the answer."),
) -> None:
    """Check one server's health over gRPC (TLS with --tls-ca); exit 0 when SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.tls import channel_credentials
    from services.local import open_channel

    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    with open_channel(address, credentials, options) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            typer.echo(f"{address}: {exc.code().name}: {exc.details()}", err=True)
            raise typer.Exit(1) from None
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    typer.echo(f"{address}: {name}")
    if status.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)
