"""The worker pool: channels, health and load of every worker (where a request goes: routing.py).

Workers come from a static list and/or a DNS name (a Kubernetes headless
Service: every A record is a worker), re-resolved periodically. Each worker is
polled for health and `Load`; one that stops answering is taken out, one that
comes (back) is taken in, without a restart. Each worker's health is also
watched as a stream: a draining worker (SIGTERM) turns NOT_SERVING and is taken
out at that message, before its connections close, so nothing new is sent there.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pb import worker_pb2, worker_pb2_grpc
from services.common.server import CHANNEL_OPTIONS
from services.gateway import metrics
from services.gateway.prefix_index import PrefixIndex

log = logging.getLogger("tokenmill.router")

POLL_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 2.0
FAILURES_BEFORE_DOWN = 2


@dataclass(eq=False)
class WorkerHandle:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    health: health_pb2_grpc.HealthStub
    live: bool = False
    info: worker_pb2.InfoResponse | None = None
    load: worker_pb2.LoadResponse = field(default_factory=worker_pb2.LoadResponse)
    failures: int = 0
    inflight: dict[str, int] = field(default_factory=dict)  # request id -> tokens still to generate
    served: int = 0
    sent: int = 0  # requests ever dispatched to it
    external: int = 0  # requests the worker reported beyond this gateway's own (other gateways, direct clients)
    eviction_serial: int = 0  # the newest prefix-cache eviction of this worker the index has taken in
    draining: bool = False  # its health stream said NOT_SERVING last

    @property
    def capacity(self) -> int:
        return max(1, self.load.capacity or 1)

    @property
    def continuous(self) -> bool:
        """Its engine adds new requests to the running batch at the next step (paged), not per whole batch."""
        return self.info is not None and self.info.block_size > 0

    @property
    def room(self) -> int:
        """Requests this worker can take now without queueing inside its engine."""
        return self.capacity - len(self.inflight)

    @property
    def queued(self) -> int:
        """Requests it is running or holding: this gateway's in flight plus those others sent it."""
        return len(self.inflight) + self.external

    @property
    def prefix_block_size(self) -> int:
        """Block size of its prefix cache; 0 if it has none (hf-static, --no-prefix-cache)."""
        return self.info.block_size if self.info is not None and self.info.prefix_caching else 0

    @property
    def outstanding_tokens(self) -> int:
        return sum(self.inflight.values())

    @property
    def free_kv(self) -> float:
        """Share of its KV blocks free at its last Load; 1 when it reports no pool (hf-static)."""
        return self.load.free_kv_blocks / self.load.total_kv_blocks if self.load.total_kv_blocks else 1.0


class WorkerPool:
    def __init__(self, static: list[str], dns: str = "", index: PrefixIndex | None = None,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str = "") -> None:
        self.static = [a.strip() for a in static if a.strip()]
        self.dns = dns
        self.index = index  # kept in step with each worker's evictions and liveness
        self.credentials = credentials  # TLS to the workers (services/common/tls.py); None = plaintext
        self.tls_options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.workers: dict[str, WorkerHandle] = {}
        self.changed = asyncio.Event()  # set when a worker comes up or frees room
        self.first_info = asyncio.Event()
        self.last_info: worker_pb2.InfoResponse | None = None  # what the last live worker served
        self._tasks: list[asyncio.Task] = []
        self._watches: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll_loop()))

    async def close(self) -> None:
        for t in [*self._tasks, *self._watches.values()]:
            t.cancel()
        for w in self.workers.values():
            await w.channel.close()

    def live(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.live]

    def info(self) -> worker_pb2.InfoResponse | None:
        """A live worker's Info, else the last one seen (the model is still ours while no worker is up)."""
        return next((w.info for w in self.live() if w.info), None) or next(
            (w.info for w in self.workers.values() if w.info), None) or self.last_info

    def candidates(self) -> list[WorkerHandle]:
        """Live workers with room for another request."""
        return [w for w in self.live() if w.room > 0]

    def notify(self) -> None:
        self.changed.set()

    # ---- discovery and health --------------------------------------------
    async def _addresses(self) -> set[str]:
        found = set(self.static)
        if self.dns:
            host, _, port = self.dns.rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                found |= {f"{info[4][0]}:{port}" for info in infos if info[0] == socket.AF_INET}
            except OSError as exc:
                log.warning("cannot resolve %s: %s", self.dns, exc)
                found |= {a for a, w in self.workers.items() if w.live and a not in self.static}
        return found

    async def _poll_loop(self) -> None:
        while True:
            try:
                addresses = await self._addresses()
                for addr in addresses - self.workers.keys():
                    channel = (grpc.aio.secure_channel(addr, self.credentials, CHANNEL_OPTIONS + self.tls_options)
                               if self.credentials else grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS))
                    w = self.workers[addr] = WorkerHandle(addr, channel, worker_pb2_grpc.WorkerStub(channel),
                                                          health_pb2_grpc.HealthStub(channel))
                    self._watches[addr] = asyncio.create_task(self._watch(w))
                for addr in list(self.workers.keys() - addresses):
                    w = self.workers[addr]
                    if not w.inflight:
                        self._watches.pop(addr).cancel()
                        await w.channel.close()
                        del self.workers[addr]
                        self._forget(addr, "down")
                await asyncio.gather(*(self._probe(w) for w in list(self.workers.values())))
                metrics.workers_live.set(len(self.live()))
            except Exception:
                log.exception("worker poll failed")
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _probe(self, w: WorkerHandle) -> None:
        try:
            check = await w.health.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
            if check.status != health_pb2.HealthCheckResponse.SERVING:
                raise ConnectionError("NOT_SERVING")
            if w.info is None:
                w.info = self.last_info = await w.stub.Info(worker_pb2.InfoRequest(), timeout=PROBE_TIMEOUT_S)
                self.first_info.set()
            # the most of ours the worker's count can include: in flight now, plus any sent during the call
            ours, sent = len(w.inflight), w.sent
            load = await w.stub.Load(worker_pb2.LoadRequest(evictions_after=w.eviction_serial), timeout=PROBE_TIMEOUT_S)
            self._take_load(w, load, ours + w.sent - sent)
            if w.draining:  # it turned NOT_SERVING while this probe was out
                raise ConnectionError("NOT_SERVING")
            w.failures = 0
            if not w.live:
                log.info("worker %s is up (%s, engine %s)", w.address, w.info.model, w.info.engine)
                w.live = True
            self.notify()
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            w.failures += 1
            if w.live and w.failures >= FAILURES_BEFORE_DOWN:
                reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning("worker %s is down: %s", w.address, reason)
                self.mark_down(w)

    async def _watch(self, w: WorkerHandle) -> None:
        """Follow the worker's health stream; NOT_SERVING (a drain) takes it out at once. The poll brings it
        back when it serves again."""
        while True:
            try:
                async for status in w.health.Watch(health_pb2.HealthCheckRequest()):
                    w.draining = status.status != health_pb2.HealthCheckResponse.SERVING
                    if w.draining and w.live:
                        log.warning("worker %s reports NOT_SERVING (draining): no new requests go there", w.address)
                        self.mark_down(w)
                        self.notify()
            except grpc.aio.AioRpcError:
                pass  # not up (yet), or gone: the poll decides; watch again shortly
            await asyncio.sleep(POLL_INTERVAL_S)

    def _take_load(self, w: WorkerHandle, load: worker_pb2.LoadResponse, ours: int) -> None:
        w.load = load
        # never count our own requests as someone else's: one that finished while Load was answered would
        # otherwise weigh on the worker as phantom load until the next poll
        w.external = max(0, load.running + load.waiting - ours)
        metrics.worker_load.labels(w.address).set(w.queued)
        if self.index is not None:
            self.index.set_pool_size(w.address, load.total_kv_blocks)
            if load.evictions_truncated:  # evictions we never saw: what we remember of it may be gone
                self.index.drop(w.address, "resync")
            else:
                self.index.forget(w.address, load.evicted_block_hashes)
        w.eviction_serial = load.eviction_serial

    def _forget(self, address: str, cause: str) -> None:
        if self.index is not None:
            self.index.drop(address, cause)

    def mark_down(self, w: WorkerHandle) -> None:
        w.live = False
        w.info = None  # re-read on recovery: it may come back with another model or engine
        w.eviction_serial = 0
        self._forget(w.address, "down")  # a dead worker's cache is gone; a restarted one starts empty
        metrics.workers_live.set(len(self.live()))


