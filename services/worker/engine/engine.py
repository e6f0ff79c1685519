"""The paged engine: step() = schedule -> forward -> sample -> update -> emit events."""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

import torch

from services.common.sampling import InvalidRequest, SamplingParams
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.detokenizer import IncrementalDetokenizer
from services.worker.engine.logprobs import SampledLogprobs, add_prompt_logprobs
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.sampler import Sampler
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import Sequence
from services.worker.engine.speculative import SpecConfig, Speculator
from services.worker.engine.types import FINISH_LENGTH, FINISH_STOP, Event, Logprob, Request, Stats

log = logging.getLogger("tokenmill.engine")


class PagedEngine:
    name = "paged"

    def __init__(self, model: Any, tokenizer: Any, *, block_size: int = 16, kv_cache_memory: str | int = "0.25",
                 num_blocks: int = 0, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int = 0, enable_prefix_caching: bool = True, seed: int | None = None,
                 speculative: SpecConfig | None = None, enforce_eager: bool = False,
                 max_waiting_steps: int = 0) -> None:
        if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs = min(max_num_seqs, max_num_batched_tokens)  # every decode fits a step
        self.runner = ModelRunner(model, block_size, kv_cache_memory, num_blocks)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, max_waiting_steps)
        self.sampler = Sampler(seed)
        own = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.max_model_len = min(max_model_len, own) if max_model_len else own
        self.vocab_size = model.config.vocab_size
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.seqs: dict[str, Sequence] = {}
        self._seq_no = 0
        spec = speculative or SpecConfig()
        self.speculator = Speculator(spec, self.runner, self.max_model_len) if spec.method != "off" else None
        if not enforce_eager:  # CUDA graphs for decode steps (tokenmill's forward on CUDA), before serving
            self.runner.enable_graphs(max_num_seqs, self.max_model_len, capture=True)
        self._grammars: Any = None
        self._grammars_lock = threading.Lock()  # the worker compiles off the engine thread

    @property
    def grammars(self) -> Any:
        """Structured-output compiler and masks, built at the first constrained request (xgrammar import and
        the tokenizer's vocabulary scan cost ~1 s)."""
        with self._grammars_lock:
            if self._grammars is None:
                from services.worker.engine.structured import Grammars

                self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    def compile_grammar(self, request: Request) -> None:
        """Compile the request's constraint (call off the engine thread); InvalidRequest if it has none."""
        if request.params.structured is not None and request.grammar is None:
            request.grammar = self.grammars.compile(request.params.structured)

    # ---- Engine protocol -----------------------------------------------------------
    def add_request(self, request: Request) -> None:
        prompt, p = request.prompt_token_ids, request.params
        p.check_fits(len(prompt), self.max_model_len)
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequest("prompt has token ids outside the model's vocabulary")
        if request.request_id in self.seqs:
            raise InvalidRequest(f"request_id {request.request_id!r} is already in the engine")
        bm = self.block_manager
        pool = bm.num_blocks * self.block_size
        if bm.blocks_needed(len(prompt)) > bm.num_blocks:
            raise InvalidRequest(f"prompt has {len(prompt)} tokens; this worker's whole KV cache holds {pool}: "
                                 "shorten the prompt or give the worker more --kv-cache-memory")
        if bm.blocks_needed(len(prompt) + p.max_tokens - 1) > bm.num_blocks:
            raise InvalidRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds this worker's "
                                 f"whole KV cache of {pool} tokens: lower max_tokens to at most "
                                 f"{bm.num_blocks * self.block_size - len(prompt) + 1}")
        generator = None
        if p.seed is not None:
            generator = torch.Generator().manual_seed(p.seed)
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
        self.compile_grammar(request)
        self._seq_no += 1
        seq = Sequence(request.request_id, list(prompt), len(prompt), p, request.priority, self._seq_no,
                       request.arrival_time, IncrementalDetokenizer(self.tokenizer, prompt, p.stop), generator,
                       stop_ids)
        if request.grammar is not None:
            seq.matcher = self.grammars.matcher(request.grammar)
        if p.prompt_logprobs:
            seq.prompt_logprobs = []
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> Stats:
        bm, sch = self.block_manager, self.scheduler
        return Stats(
            running=len(sch.running), waiting=len(sch.waiting), free_kv_blocks=bm.num_free_blocks,
            total_kv_blocks=bm.num_blocks, capacity=self.max_num_seqs,
            outstanding_tokens=sum(s.params.max_tokens - s.num_output_tokens for s in self.seqs.values()),
            kv_tokens=sum(s.num_computed_tokens - s.num_freed_blocks * self.block_size for s in sch.running),
            prefix_cache_queries=bm.queries, prefix_cache_hits=bm.hits, num_preemptions=sch.num_preemptions,
            spec_draft_tokens=self.speculator.num_draft_tokens if self.speculator else 0,
            spec_accepted_tokens=self.speculator.num_accepted_tokens if self.speculator else 0,
        )

    def step(self) -> list[Event]:
        spec = self.speculator
        if spec:
            spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if self.block_manager.fresh:
            self.runner.kv.zero_blocks(self.block_manager.fresh)
            self.block_manager.fresh.clear()
        if spec:
            spec.fill(batch.seqs)
        samplers, logits = self.runner.run(batch)
        for seq in batch.seqs:
            if not seq.spec_token_ids:  # drafted ones advance once verified
                self._advance(seq, seq.num_new_tokens)
        for seq, first, rows in self.runner.prompt_logits:
            add_prompt_logprobs(seq, first, rows)
        if logits is None:
            return []
        rows_per_seq = [1 + len(s.spec_token_ids) for s in samplers]
        logprobs = SampledLogprobs(logits, samplers, rows_per_seq) if any(s.params.logprobs for s in samplers) \
            else None
        if any(s.matcher is not None for s in samplers):  # constrained rows never carry drafts
            starts = list(itertools.accumulate(rows_per_seq, initial=0))[:-1]
            rows = [(row, s) for row, s in zip(starts, samplers, strict=True) if s.matcher is not None]
            self.grammars.mask(logits, rows)
        if spec and any(s.spec_token_ids for s in samplers):
            tokens = spec.accept(logits, samplers, self.sampler)
        else:
            tokens = [[t] for t in self.sampler(logits, samplers)]
        events = []
        for i, (seq, toks) in enumerate(zip(samplers, tokens, strict=True)):
            drafted = bool(seq.spec_token_ids)
            seq.spec_token_ids = []
            events.append(self._append(seq, toks, len(batch.seqs), logprobs.take(i, seq, toks) if logprobs else None))
            if drafted and seq.request_id in self.seqs:  # the fed token and the kept drafts are in the cache
                self._advance(seq, len(toks))
                self.block_manager.truncate(seq, seq.num_computed_tokens + 1)
        return events

    # ---- helpers ---------------------------------------------------------------------
    def _advance(self, seq: Sequence, computed: int) -> None:
        seq.num_computed_tokens += computed
        seq.num_new_tokens = 0
        self.block_manager.register_full_blocks(seq)
        if window := self.runner.window:  # the next query (at num_computed_tokens) sees keys after it - window
            self.block_manager.release_before(seq, max(0, seq.num_computed_tokens - window + 1) // self.block_size)

    def _append(self, seq: Sequence, tokens: list[int], batch_size: int, logprobs: list[Logprob] | None = None
                ) -> Event:
        """Append the step's tokens (several when drafts were accepted) up to the first that finishes."""
        reason = None
        text = ""
        taken: list[int] = []
        for token in tokens:
            seq.token_ids.append(token)
            taken.append(token)
            # a sequence with a matcher means _grammars exists: no lock per token
            if seq.matcher is not None and (not self._grammars.accept(seq, token) or self._grammars.finished(seq)):
                reason = FINISH_STOP  # the grammar is complete (it took a stop token), or refused the token
                if token not in seq.stop_ids:
                    text += seq.detok.add([token])
                break
            if token in seq.stop_ids:
                reason = FINISH_STOP
                break
            text += seq.detok.add([token])
            if seq.detok.stopped:
                reason = FINISH_STOP
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = FINISH_LENGTH
            if reason is not None:
                break
        if reason is not None:
            text += seq.detok.flush()
            del self.seqs[seq.request_id]
            self.scheduler.remove(seq)
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return Event(seq.request_id, taken, text, finish_reason=reason, prompt_tokens=seq.num_prompt_tokens,
                     completion_tokens=seq.num_output_tokens, cached_tokens=seq.num_cached_tokens,
                     batch_size=batch_size, logprobs=logprobs[: len(taken)] if logprobs is not None else None,
                     prompt_logprobs=prompt_logprobs)

    def warmup(self) -> None:
        """One short request through every path, so the first real request does not pay for lazy init."""
        bm = self.block_manager
        queries, hits = bm.queries, bm.hits
        self.add_request(Request("__warmup__", [min(self.eos_ids, default=0)] * 3,
                                 SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)))
        while self.has_work():
            self.step()
        bm.queries, bm.hits = queries, hits


def engine_options(config: Any) -> dict[str, Any]:
    """PagedEngine keyword arguments from a WorkerConfig (the worker and the benchmarks both build from it)."""
    return dict(block_size=config.block_size, kv_cache_memory=config.kv_cache_memory,
                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=config.max_model_len, enable_prefix_caching=config.prefix_cache,
                enforce_eager=config.enforce_eager, max_waiting_steps=config.max_waiting_steps,
                speculative=SpecConfig(config.speculative, config.num_speculative_tokens, config.draft_layers,
                                       config.speculative_max_batch, config.speculative_min_acceptance,
                                       config.speculative_token_cost))


def build_paged_engine(config: Any) -> tuple[Any, PagedEngine]:
    """The worker's `--engine paged`: load the model, size the KV pool from --kv-cache-memory, warm up."""
    from services.common.model_loader import load_engine_model

    loaded = load_engine_model(config.model, config.quantization, config.device, config.dtype, config.model_impl)
    engine = PagedEngine(loaded.model, loaded.tokenizer, **engine_options(config))
    engine.warmup()
    return loaded, engine
