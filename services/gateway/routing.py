"""Which worker a request goes to: the routing policies --routing names, over the live workers with room.

--routing least-loaded: fewest requests in flight per unit of capacity (a slow worker keeps its requests longer,
so it gets fewer new ones), then fewest outstanding tokens, then most free KV blocks.

--routing prefix-aware: scorers over the candidates (llm-d's endpoint picker) and a balance guard (SGLang's
cache-aware router). Each candidate gets

    score = prefix_weight * cached share of the prompt   (blocks the index says it holds / prompt tokens;
                                                          0 below --routing-cache-threshold)
          + load_weight   * (most loaded - its load) / (most loaded - least loaded)   (1 when all are equal;
                                                          load = requests it holds / its capacity)
          + kv_weight     * its free share of KV blocks

and the highest score wins (ties at random). The load scorer is min-max normalised over the candidates, as
llm-d's queue scorer is: any load difference is worth the whole load weight, so only a prefix worth more
(share > load_weight / prefix_weight, 2/3 by default: a conversation's history, a long system prompt) keeps a
request on a busier worker. The threshold (SGLang's cache_threshold) keeps a short shared
prefix, such as the chat template's system prompt, from drawing every request to the first worker that saw it.
A request with a session_id goes to its session's worker instead, while that one is a candidate.
Then the guard, SGLang's imbalance rule applied to the chosen worker: when it holds more than
--routing-balance-abs requests beyond the least-loaded candidate AND more than --routing-balance-rel times as
many, the least-loaded candidate gets the request.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from services.common.config import GatewayConfig
from services.common.prefix_hash import block_hashes, cacheable_blocks
from services.gateway import metrics
from services.gateway.pending import Pending
from services.gateway.pool import WorkerHandle
from services.gateway.prefix_index import PrefixIndex

ROUTINGS = ("least-loaded", "prefix-aware")
MAX_SESSIONS = 65536  # session id -> worker entries kept (LRU)
MAX_SESSION_ID_CHARS = 256


@dataclass(slots=True)
class Choice:
    worker: WorkerHandle
    reason: str  # a label of tokenmill:routing_prefix_hits
    matched_tokens: int = 0  # prompt tokens the index expects the worker to have cached


def routing_policy(config: GatewayConfig, index: PrefixIndex | None) -> Policy:
    """The policy --routing names (prefix-aware keeps `index` in step with its decisions); ValueError on bad
    --routing* flags."""
    if config.routing not in ROUTINGS:
        raise ValueError(f"unknown --routing {config.routing!r}: use one of {', '.join(ROUTINGS)}")
    weights = (config.routing_prefix_weight, config.routing_load_weight, config.routing_kv_weight)
    if min(weights) < 0:
        raise ValueError("--routing-prefix-weight, --routing-load-weight and --routing-kv-weight must be >= 0")
    if config.routing_balance_abs < 0 or config.routing_balance_rel < 1:
        raise ValueError("--routing-balance-abs must be >= 0 and --routing-balance-rel >= 1")
    if not 0 <= config.routing_cache_threshold <= 1:
        raise ValueError("--routing-cache-threshold is a share of the prompt: give a value in [0, 1]")
    if config.routing == "least-loaded":
        return LeastLoaded()
    if index is None:
        raise ValueError("prefix-aware routing needs a prefix index")
    return PrefixAware(config, index)


class Policy:
    """What the batcher asks of a policy; every policy counts its decisions and the cached tokens served."""

    def choose(self, p: Pending, candidates: list[WorkerHandle]) -> Choice | None:
        raise NotImplementedError

    def joins(self, p: Pending, worker: WorkerHandle, candidates: list[WorkerHandle]) -> Choice | None:
        """p's route when it also goes to `worker`, whose batch is being formed; else None."""
        raise NotImplementedError

    def dispatched(self, p: Pending, choice: Choice) -> None:
        """p was sent to choice.worker."""
        metrics.routing_decisions.labels(choice.reason).inc()

    def finished(self, p: Pending, worker: WorkerHandle) -> None:
        """p completed on worker."""
        metrics.cached_tokens.inc(p.usage.cached_tokens)


class LeastLoaded(Policy):
    def choose(self, p: Pending, candidates: list[WorkerHandle]) -> Choice | None:
        if not candidates:
            return None
        return Choice(min(candidates, key=lambda w: (len(w.inflight) / w.capacity, w.outstanding_tokens / w.capacity,
                                                     -w.free_kv, random.random())), "least_loaded")

    def joins(self, p: Pending, worker: WorkerHandle, candidates: list[WorkerHandle]) -> Choice | None:
        return Choice(worker, "least_loaded")  # the batch fills in queue order, as a static-batch worker wants


class PrefixAware(Policy):
    def __init__(self, config: GatewayConfig, index: PrefixIndex) -> None:
        self.config = config
        self.index = index
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def choose(self, p: Pending, candidates: list[WorkerHandle]) -> Choice | None:
        if not candidates:
            return None
        matched = {w.address: self._matched(p, w) for w in candidates}
        share = {a: self._share(p, m) for a, m in matched.items()}
        pinned = self._session_worker(p, candidates)
        if pinned is not None:
            best, reason = pinned, "session"
        else:
            loads = [w.queued / w.capacity for w in candidates]
            lo, hi = min(loads), max(loads)
            best = max(candidates, key=lambda w: (self._score(w, share[w.address], lo, hi), random.random()))
            top = max(share.values())
            reason = "miss" if top == 0 else "prefix" if share[best.address] == top else "load"
        least = min(candidates, key=lambda w: (w.queued / w.capacity, random.random()))
        c = self.config
        if best is not least and best.queued - least.queued > c.routing_balance_abs and \
                best.queued > c.routing_balance_rel * least.queued:
            best, reason = least, "balance"
        return Choice(best, reason, matched[best.address])

    def joins(self, p: Pending, worker: WorkerHandle, candidates: list[WorkerHandle]) -> Choice | None:
        choice = self.choose(p, candidates)
        return choice if choice is not None and choice.worker is worker else None

    def dispatched(self, p: Pending, choice: Choice) -> None:
        """Also remember p's prompt blocks (and session) at the worker."""
        super().dispatched(p, choice)
        metrics.predicted_cached_tokens.inc(choice.matched_tokens)
        w = choice.worker
        if w.prefix_block_size:
            self.index.add(w.address, self._hashes(p, w.prefix_block_size))
        if p.session_id:
            self.sessions[p.session_id] = w.address
            self.sessions.move_to_end(p.session_id)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)

    def finished(self, p: Pending, worker: WorkerHandle) -> None:
        """The worker now also caches p's output: every full block of the tokens it computed (the prompt and
        all output tokens but the last, which is sampled and never fed back)."""
        super().finished(p, worker)
        bs = worker.prefix_block_size
        if bs:
            self.index.add(worker.address, block_hashes(p.prompt_ids + p.token_ids[:-1], bs))

    # ---- scorers -----------------------------------------------------------------------------------
    def _share(self, p: Pending, matched: int) -> float:
        share = matched / max(1, len(p.prompt_ids))
        return share if share >= self.config.routing_cache_threshold else 0.0

    def _score(self, w: WorkerHandle, share: float, lo: float, hi: float) -> float:
        c = self.config
        load = (hi - w.queued / w.capacity) / (hi - lo) if hi > lo else 1.0
        return c.routing_prefix_weight * share + c.routing_load_weight * load + c.routing_kv_weight * w.free_kv

    def _matched(self, p: Pending, w: WorkerHandle) -> int:
        bs = w.prefix_block_size
        return self.index.match(w.address, self._hashes(p, bs)) * bs if bs else 0

    @staticmethod
    def _hashes(p: Pending, block_size: int) -> list[int]:
        hashes = p.hashes.get(block_size)
        if hashes is None:
            hashes = p.hashes[block_size] = block_hashes(
                p.prompt_ids, block_size, cacheable_blocks(len(p.prompt_ids), block_size))
        return hashes

    def _session_worker(self, p: Pending, candidates: list[WorkerHandle]) -> WorkerHandle | None:
        address = self.sessions.get(p.session_id) if p.session_id else None
        return next((w for w in candidates if w.address == address), None) if address else None
