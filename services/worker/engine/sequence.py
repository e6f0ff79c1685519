"""Per-request state inside the paged engine: tokens, progress through the KV cache, block table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from services.common.sampling import SamplingParams


@dataclass(slots=True, eq=False)
class SequenceGroup:
    """The samples of one request with n / best_of > 1. The first sequence prefills the prompt alone; when it
    samples its first token the rest fork from it (sharing its KV blocks) and each goes its own way."""

    n: int  # choices returned
    best_of: int  # samples generated
    seqs: list[Sequence]  # by sample index: the parent alone until the fork
    grammar: Any = None  # compiled grammar of a constrained request: each fork gets its own matcher
    finished: int = 0  # samples finished
    held: dict = field(default_factory=dict)  # best_of > n: sample index -> its whole output (an Event) so far

    @property
    def forked(self) -> bool:
        return len(self.seqs) == self.best_of


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt then output; grows by one per decode step
    num_prompt_tokens: int
    params: SamplingParams
    priority: int
    seq_no: int  # admission order: FCFS tie-break, and "newest" for preemption
    arrival_time: float
    detok: Any = None  # IncrementalDetokenizer
    generator: Any = None  # torch.Generator when the request set a seed
    stop_ids: frozenset[int] = frozenset()
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks, in order
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_new_tokens: int = 0  # tokens scheduled in the current step
    num_preemptions: int = 0
    num_freed_blocks: int = 0  # leading blocks released because they slid out of the attention window
    first_scheduled: bool = False
    spec_token_ids: list[int] = field(default_factory=list)  # drafted tokens verified this step (speculation)
    spec_drafted: int = 0  # this sequence's drafted / accepted tokens so far: its own acceptance rate
    spec_accepted: int = 0
    spec_idle_steps: int = 0  # decode steps without drafts since its rate fell below the minimum
    matcher: Any = None  # grammar matcher of a constrained request (structured output), advanced per token
    prompt_logprobs: list | None = None  # Logprob of prompt tokens 2..n so far, when the request asked
    prompt_logprobs_sent: bool = False  # they went out with the first event
    penalties: Any = None  # sampler.PenaltyState of a request with penalties, bias, min_tokens or bad words
    index: int = 0  # its sample's index within a parallel-sampling request (n / best_of > 1)
    group: SequenceGroup | None = None  # the request's samples, when it has more than one
    cumulative_logprob: float = 0.0  # sum of its generated tokens' logprobs (kept for best_of > n)

    @property
    def wants_prompt_rows(self) -> bool:
        """Its prompt logprobs are incomplete: the runner keeps its prefill rows' logits (and the prefix cache
        must not skip any of them)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def sort_key(self) -> tuple[int, int]:
        """Lower runs first: priority, then arrival (FCFS)."""
        return (self.priority, self.seq_no)

    @property
    def samples_this_step(self) -> bool:
        """True when the scheduled chunk reaches the end of the known tokens, so its last logits pick a token
        (past the end when drafted tokens ride along)."""
        return self.num_computed_tokens + self.num_new_tokens >= self.num_tokens

    def step_token_ids(self, n: int) -> list[int]:
        """The n tokens fed this step: known tokens from num_computed_tokens on, then any drafted ones."""
        c = self.num_computed_tokens
        if not self.spec_token_ids:
            return self.token_ids[c : c + n]
        return (self.token_ids[c:] + self.spec_token_ids)[:n]
