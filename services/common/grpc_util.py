"""Small gRPC helpers shared by the services."""

from __future__ import annotations

import grpc

from services.common.pb import inference_pb2

FINISH_REASONS = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "cancelled": inference_pb2.FINISH_REASON_CANCELLED,
    "error": inference_pb2.FINISH_REASON_ERROR,
}
FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}


def status_code(name: str) -> grpc.StatusCode:
    """grpc.StatusCode from its name ('INVALID_ARGUMENT'); INTERNAL for anything unknown."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)


def code_number(name: str) -> int:
    return status_code(name).value[0]


def code_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return "INTERNAL"
