"""Which sequences run this step, and how many of their tokens (vLLM v1 style, no prefill/decode phases).

Every step has a token budget and a sequence cap. Running sequences go first, in
(priority, arrival) order: a decode takes one token, an unfinished prompt takes
the next chunk that fits the budget. When a running sequence needs a block and
none is free, the newest lowest-priority running sequence is preempted: its blocks
are released (full ones stay in the prefix cache) and it is recomputed later.
Waiting sequences are admitted only in steps without preemption. A parallel-sampling request (n / best_of > 1)
is admitted as one sequence that reserves a slot for each of its samples; its samples fork from it once the
prompt is prefilled (BlockManager.fork) and from then on are scheduled, and preempted and recomputed, one by
one like any other sequence: each keeps its tokens and its own generator, so a recomputed sample continues
exactly where it was. A decode may carry drafted
tokens (speculation): they count against the budget and are dropped rather than preempt.

`max_waiting_steps` (TGI's max-waiting-tokens): while sequences run, new prompts wait up to that many
steps, or until they would fill the step's budget, and are then prefilled together. On a GPU a step
with any prefill runs eagerly while a decode-only step replays a CUDA graph, so a few full prefill
steps cost far less than a small one in every step; an idle engine admits at once.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)  # decodes (one new token) first, then prefill chunks
    num_decodes: int = 0
    num_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_waiting_steps: int = 0) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting_steps = max_waiting_steps
        self._held_steps = 0  # steps the waiting prompts have been held back (max_waiting_steps)
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key; the tail is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample: it already holds its blocks (shared with its parent)."""
        seq.status = SeqStatus.RUNNING
        seq.first_scheduled = True
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    @property
    def slots_taken(self) -> int:
        """Running sequences plus the samples the unforked parallel-sampling requests among them will add."""
        return len(self.running) + sum(s.group.best_of - 1 for s in self.running
                                       if s.group is not None and not s.group.forked)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of its queue and release its blocks (finish or abort)."""
        (self.running if seq.status == SeqStatus.RUNNING else self.waiting).remove(seq)
        self.bm.release(seq)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens + len(seq.spec_token_ids), budget)
            if seq.spec_token_ids and not self.bm.can_grow(seq, seq.num_computed_tokens + n):
                n = 1  # drafts never preempt anyone: drop them
            del seq.spec_token_ids[max(0, n - 1) :]  # drafts the budget cut off
            while not self.bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SeqStatus.RUNNING:
                break
            self.bm.grow(seq, seq.num_computed_tokens + n)
            seq.num_new_tokens = n
            scheduled.append(seq)
            budget -= n
            i += 1
        if not out.preempted and self._admission_due(budget):
            self._admit(scheduled, budget)
        for seq in scheduled:
            seq.first_scheduled = True
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        out.seqs = decodes + [s for s in scheduled if s.num_new_tokens > 1]
        out.num_decodes = len(decodes)
        out.num_tokens = sum(s.num_new_tokens for s in scheduled)
        return out

    def _admission_due(self, budget: int) -> bool:
        if not self.waiting or self.max_waiting_steps <= 0 or not self.running:
            self._held_steps = 0
            return True
        if self._held_steps >= self.max_waiting_steps or \
                sum(s.num_tokens - s.num_computed_tokens for s in self.waiting) >= budget:
            self._held_steps = 0
            return True
        self._held_steps += 1
        return False

    def _admit(self, scheduled: list[Sequence], budget: int) -> None:
        taken = self.slots_taken
        while self.waiting and budget > 0 and taken < self.max_num_seqs:
            seq = self.waiting[0]
            slots = seq.group.best_of if seq.group is not None and not seq.group.forked else 1
            if taken + slots > self.max_num_seqs:
                break
            # every prompt position of a prompt-logprobs request needs its logits: none may come from the cache
            hits, hashes = ([], []) if seq.wants_prompt_rows else self.bm.match_prefix(seq)
            n = min(seq.num_tokens - len(hits) * self.bm.block_size, budget)
            if not self.bm.can_admit(hits, len(hits) * self.bm.block_size + n):
                break
            self.waiting.pop(0)
            self.bm.admit(seq, hits, hashes, len(hits) * self.bm.block_size + n)
            if not seq.first_scheduled:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SeqStatus.RUNNING
            seq.num_new_tokens = n
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            scheduled.append(seq)
            budget -= n
            taken += slots

    def _preempt(self, seq: Sequence) -> None:
        self.bm.release(seq)
        seq.spec_token_ids.clear()
        seq.num_new_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
