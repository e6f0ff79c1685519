"""TLS for the gRPC servers, the gateway's HTTP front, and the gateway's channels to its workers.

- A server with `--tls-cert` and `--tls-key` (PEM files) serves TLS only.
- A worker with `--tls-ca` also requires every client to present a certificate signed by that CA (mTLS):
  only a gateway holding one can submit work.
- A gateway with `--tls-ca` dials its workers over TLS, trusting that CA, and presents its own
  `--tls-cert`/`--tls-key` as its client certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SystemExit(f"{flag} {path}: {exc.strerror}") from None


def check_pair(cert: str, key: str) -> None:
    if bool(cert) != bool(key):
        raise SystemExit("--tls-cert and --tls-key go together: give both (PEM files) or neither")


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """None without a certificate (plaintext); with client_ca, client certificates are required."""
    check_pair(cert, key)
    if not cert:
        if client_ca:
            raise SystemExit("--tls-ca needs --tls-cert and --tls-key: client certificates are checked over TLS")
        return None
    pair = [(_read(key, "--tls-key"), _read(cert, "--tls-cert"))]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "--tls-ca"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS trusting `ca`, presenting cert/key as the client certificate when given; None (plaintext) without
    a CA."""
    if not ca:
        return None
    check_pair(cert, key)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca"),
        private_key=_read(key, "--tls-key") if key else None,
        certificate_chain=_read(cert, "--tls-cert") if cert else None,
    )


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The HTTP front's TLS context (same certificate as the gRPC port); None without one."""
    check_pair(cert, key)
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"--tls-cert/--tls-key: {exc}") from None
    return ctx
