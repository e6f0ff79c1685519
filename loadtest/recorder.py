"""One finished request, recorded once: a row of the per-request CSV and the Locust event(s) it fires."""

from __future__ import annotations

import csv
import time
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

TTFT_SUFFIX = " TTFT"


@dataclass
class Outcome:
    """One finished request: a row of the per-request CSV and the source of its Locust event(s)."""

    timestamp: str = ""            # request start, ISO 8601 UTC
    epoch_s: float = 0.0           # request start, Unix seconds
    protocol: str = ""             # grpc | http
    kind: str = ""                 # Generate | GenerateStream
    request_id: str = ""
    worker: str = ""               # the worker that served it (tokenmill gateway's timing.worker)
    status: str = "OK"             # OK, a gRPC status name, or HTTP <code> ..., TIMEOUT, CONNECTION_ERROR
    ttft_ms: float | None = None   # streams: measured here; unary: the gateway's timing.ttft_ms
    latency_ms: float = 0.0        # end to end, measured here
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    tokens_per_s: float | None = None  # completion tokens / end-to-end seconds
    batch_size: int | None = None
    queue_ms: float | None = None
    gateway_ttft_ms: float | None = None
    gateway_total_ms: float | None = None
    finish_reason: str = ""
    response_bytes: int = 0
    error: str = ""                # the status details (the Locust failure carries only `status`)
    client_ttft_ms: float | None = None  # TTFT as this client saw it (streams only)


COLUMNS = [f.name for f in fields(Outcome)]


class Recorder:
    """Fires the Locust events of each outcome and appends its CSV row; one per Locust process."""

    def __init__(self) -> None:
        self.file = None
        self.writer = None
        self.path: Path | None = None
        self.rows = 0
        self.inflight: dict[int, Outcome] = {}  # sent, not yet recorded; left over at the end = abandoned
        self.statuses: dict[str, int] = {}
        self.completion_tokens = 0

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS)
        self.writer.writeheader()
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def record(self, environment, o: Outcome) -> None:
        self.inflight.pop(id(o), None)
        if o.completion_tokens and o.latency_ms > 0:
            o.tokens_per_s = round(o.completion_tokens / (o.latency_ms / 1000), 3)
        ok = o.status == "OK"
        self.statuses[o.status] = self.statuses.get(o.status, 0) + 1
        self.completion_tokens += (o.completion_tokens or 0) if ok else 0
        fire = environment.events.request.fire
        if o.client_ttft_ms is not None:
            fire(request_type=o.protocol, name=o.kind + TTFT_SUFFIX, response_time=o.client_ttft_ms,
                 response_length=0, response=None, context={}, exception=None)
        fire(request_type=o.protocol, name=o.kind, response_time=o.latency_ms, response_length=o.response_bytes,
             response=None, context={}, exception=None if ok else o.status)
        if self.writer is not None:
            row = {k: ("" if v is None else round(v, 3) if isinstance(v, float) else v) for k, v in asdict(o).items()}
            self.writer.writerow(row)
            self.file.flush()
            self.rows += 1


RECORDER = Recorder()


def start(kind: str, protocol: str) -> tuple[Outcome, float]:
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    o = Outcome(timestamp=stamp, epoch_s=round(now, 3), protocol=protocol, kind=kind,
                request_id=f"lt-{uuid.uuid4().hex[:16]}")
    RECORDER.inflight[id(o)] = o
    return o, time.perf_counter()


def elapsed_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
