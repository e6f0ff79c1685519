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
from services.worker.engine.sampler import PenaltyState, Sampler, process_logits
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import SeqStatus, Sequence, SequenceGroup
from services.worker.engine.speculative import SpecConfig, Speculator
from services.worker.engine.types import FINISH_LENGTH, FINISH_STOP, Event, Logprob, Request, Stats

log = logging.getLogger("tokenmill.engine")


class PagedEngine:
    name = "paged"

    def __init__(self, model: Any, tokenizer: Any, *, block_size: int = 16, kv_cache_memory: str | int = "0.25",
                 num_blocks: int = 0, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int = 0, enable_prefix_caching: bool = True, seed: int | None = None,
                 speculative: SpecConfig | None = None, enforce_eager: bool = False,
                 max_waiting_steps: int = 0, kv_cache_dtype: str = "auto") -> None:
        if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs = min(max_num_seqs, max_num_batched_tokens)  # every decode fits a step
        self.runner = ModelRunner(model, block_size, kv_cache_memory, num_blocks, kv_cache_dtype)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, max_waiting_steps)
        self.sampler = Sampler(seed)
        own = self.runner.shape.context_length
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
        p.check_vocab(self.vocab_size)
        if p.best_of > self.max_num_seqs:
            raise InvalidRequest(f"best_of / n of {p.best_of} exceeds the {self.max_num_seqs} sequences this worker "
                                 "runs at once (--max-num-seqs): ask for fewer samples")
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
        self.compile_grammar(request)
        self._seq_no += 1
        seq = Sequence(request.request_id, list(prompt), len(prompt), p, request.priority, self._seq_no,
                       request.arrival_time, IncrementalDetokenizer(self.tokenizer, prompt, p.stop),
                       sample_generator(p.seed, 0), stop_ids)
        if request.grammar is not None:
            seq.matcher = self.grammars.matcher(request.grammar)
        if p.penalised:
            seq.penalties = PenaltyState(sorted(set(prompt)) if p.repetition_penalty != 1.0 else [],
                                         bad_words=bad_word_ids(self.tokenizer, p.bad_words, self.vocab_size))
        if p.best_of > 1:
            seq.group = SequenceGroup(p.n, p.best_of, [seq], request.grammar)
        if p.prompt_logprobs:
            seq.prompt_logprobs = []
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        for s in seq.group.seqs if seq.group is not None else [seq]:  # every sample of the request
            if s.status != SeqStatus.FINISHED:
                self.scheduler.remove(s)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> Stats:
        bm, sch = self.block_manager, self.scheduler
        return Stats(
            running=len(sch.running), waiting=len(sch.waiting), free_kv_blocks=bm.num_free_blocks,
            total_kv_blocks=bm.num_blocks, capacity=self.max_num_seqs,
            outstanding_tokens=sum(s.params.max_tokens - s.num_output_tokens for s in self._all_seqs()),
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
        if self.block_manager.copies:  # copy-on-write of blocks forked samples shared (after zeroing: a copy
            self.runner.kv.copy_blocks(self.block_manager.copies)  # may land in a fresh block)
            self.block_manager.copies.clear()
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
        if any(s.group is not None and not s.group.forked for s in samplers):
            samplers, logits = self._fork(samplers, logits)
        rows_per_seq = [1 + len(s.spec_token_ids) for s in samplers]
        logprobs = SampledLogprobs(logits, samplers, rows_per_seq) if any(s.params.logprobs for s in samplers) \
            else None
        starts = list(itertools.accumulate(rows_per_seq, initial=0))[:-1]
        ranked = [(row, s) for row, s in zip(starts, samplers, strict=True)
                  if s.group is not None and s.group.best_of > s.group.n]  # best_of: raw logprobs, ranked later
        raw = torch.log_softmax(logits[[row for row, _ in ranked]], dim=-1) if ranked else None
        if any(s.matcher is not None for s in samplers):  # constrained rows never carry drafts
            rows = [(row, s) for row, s in zip(starts, samplers, strict=True) if s.matcher is not None]
            self.grammars.mask(logits, rows)
        if any(s.penalties is not None for s in samplers):  # penalised rows never carry drafts either
            process_logits(logits, [(row, s) for row, s in zip(starts, samplers, strict=True)
                                    if s.penalties is not None])
        if spec and any(s.spec_token_ids for s in samplers):
            tokens = spec.accept(logits, samplers, self.sampler)
        else:
            tokens = [[t] for t in self.sampler(logits, samplers)]
        if ranked:
            picked = {id(s): i for i, s in enumerate(samplers)}
            for j, (_, s) in enumerate(ranked):
                s.cumulative_logprob += float(raw[j, tokens[picked[id(s)]][0]])
        events = []
        for i, (seq, toks) in enumerate(zip(samplers, tokens, strict=True)):
            drafted = bool(seq.spec_token_ids)
            seq.spec_token_ids = []
            events.extend(self._append(seq, toks, len(batch.seqs), logprobs.take(i, seq, toks) if logprobs else None))
            if drafted and seq.status != SeqStatus.FINISHED:  # the fed token and the kept drafts are in the cache
                self._advance(seq, len(toks))
                self.block_manager.truncate(seq, seq.num_computed_tokens + 1)
        return events

    def _fork(self, samplers: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Parallel sampling: a parent whose prompt was just prefilled forks into its other samples, which share
        its KV blocks and sample their first token from its logits row (each with its own generator)."""
        out: list[Sequence] = []
        index: list[int] = []
        row = 0
        for seq in samplers:
            k = 1 + len(seq.spec_token_ids)
            out.append(seq)
            index.extend(range(row, row + k))
            group = seq.group
            if group is not None and not group.forked:
                for i in range(1, group.best_of):
                    child = self._child(seq, i)
                    group.seqs.append(child)
                    out.append(child)
                    index.append(row + k - 1)
            row += k
        return out, logits[index]

    def _child(self, parent: Sequence, i: int) -> Sequence:
        p, prompt = parent.params, parent.token_ids[: parent.num_prompt_tokens]
        child = Sequence(parent.request_id, list(parent.token_ids), parent.num_prompt_tokens, p, parent.priority,
                         parent.seq_no, parent.arrival_time, IncrementalDetokenizer(self.tokenizer, prompt, p.stop),
                         sample_generator(p.seed, i), parent.stop_ids, index=i, group=parent.group)
        child.num_cached_tokens = parent.num_cached_tokens
        if parent.group.grammar is not None:
            child.matcher = self.grammars.matcher(parent.group.grammar)
        if parent.penalties is not None:
            child.penalties = PenaltyState(parent.penalties.prompt_ids, bad_words=parent.penalties.bad_words)
        self.block_manager.fork(parent, child)
        self.scheduler.add_running(child)
        return child

    def _all_seqs(self) -> list[Sequence]:
        return [s for seq in self.seqs.values() for s in (seq.group.seqs if seq.group is not None else [seq])
                if s.status != SeqStatus.FINISHED]

    # ---- helpers ---------------------------------------------------------------------
    def _advance(self, seq: Sequence, computed: int) -> None:
        seq.num_computed_tokens += computed
        seq.num_new_tokens = 0
        self.block_manager.register_full_blocks(seq)
        if window := self.runner.shape.window:  # the next query (at num_computed_tokens) sees keys after it - window
            self.block_manager.release_before(seq, max(0, seq.num_computed_tokens - window + 1) // self.block_size)

    def _append(self, seq: Sequence, tokens: list[int], batch_size: int, logprobs: list[Logprob] | None = None
                ) -> list[Event]:
        """Append the step's tokens (several when drafts were accepted) up to the first that finishes; the
        events to send (none while a best_of request holds its samples back, all n when its last one ends)."""
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
        group = seq.group
        if reason is not None:
            text += seq.detok.flush()
            self.scheduler.remove(seq)
            if group is not None:
                group.finished += 1
            if group is None or group.finished == group.best_of:
                del self.seqs[seq.request_id]
        prompt_logprobs = None
        streams = group is None or group.n == group.best_of
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and streams:
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        completion = seq.num_output_tokens if group is None else sum(s.num_output_tokens for s in group.seqs)
        event = Event(seq.request_id, taken, text, finish_reason=reason, prompt_tokens=seq.num_prompt_tokens,
                      completion_tokens=completion, cached_tokens=seq.num_cached_tokens,
                      batch_size=batch_size, logprobs=logprobs[: len(taken)] if logprobs is not None else None,
                      prompt_logprobs=prompt_logprobs, index=seq.index)
        if streams:
            return [event]
        return self._hold(group, seq, event)

    def _hold(self, group: SequenceGroup, seq: Sequence, event: Event) -> list[Event]:
        """best_of > n: gather each sample's whole output; when the last finishes, return the n with the highest
        cumulative logprob (vLLM's rule) as one event each, indexed by rank."""
        whole = group.held.get(seq.index)
        if whole is None:
            whole = group.held[seq.index] = Event(seq.request_id, [], "", prompt_tokens=event.prompt_tokens,
                                                  cached_tokens=event.cached_tokens,
                                                  logprobs=[] if event.logprobs is not None else None)
        whole.token_ids += event.token_ids
        whole.text += event.text
        if event.logprobs is not None:
            whole.logprobs += event.logprobs
        whole.finish_reason, whole.batch_size = event.finish_reason, event.batch_size
        if group.finished < group.best_of:
            return []
        best = sorted(group.seqs, key=lambda s: -s.cumulative_logprob)[: group.n]
        events = [group.held[s.index] for s in best]
        for rank, e in enumerate(events):
            e.index, e.completion_tokens = rank, event.completion_tokens
        events[0].prompt_logprobs = group.seqs[0].prompt_logprobs
        return events

    def warmup(self) -> None:
        """One short request through every path, so the first real request does not pay for lazy init."""
        bm = self.block_manager
        queries, hits = bm.queries, bm.hits
        self.add_request(Request("__warmup__", [min(self.eos_ids, default=0)] * 3,
                                 SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)))
        while self.has_work():
            self.step()
        bm.queries, bm.hits = queries, hits


def sample_generator(seed: int | None, index: int) -> torch.Generator | None:
    """The generator of a seeded request's sample `index`: seed + index (as vLLM seeds parallel samples), so
    sample 0 is what the request gives with n = 1."""
    return None if seed is None else torch.Generator().manual_seed((seed + index) % 2**64)


def bad_word_ids(tokenizer: Any, words: tuple[str, ...], vocab_size: int) -> list[list[int]]:
    """Token ids of each bad word as it would appear in the output: alone and after a space (vLLM's two
    spellings); spellings with a token outside the model's vocabulary are dropped."""
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out and max(ids) < vocab_size:
                out.append(ids)
    return out
