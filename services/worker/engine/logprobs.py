"""Log-probabilities for the requests that ask: the chosen tokens' and the top-k at each position.

Values are log_softmax of the model's raw logits at the position (before temperature, top-k/top-p and any
grammar mask), as vLLM reports them by default ("raw_logprobs"): for a greedy request that is the
distribution it took the argmax of; for a sampled one, what the model said before the sampling settings.
Computed only for the rows of requests that asked, before the sampler or a mask touches the logits.
"""

from __future__ import annotations

import torch

from services.worker.engine.sequence import Sequence
from services.worker.engine.types import Logprob


def logprob_list(logprobs: torch.Tensor, tokens: list[int], k: int) -> list[Logprob]:
    """logprobs [>= len(tokens), vocab] (row j scores tokens[j]) -> one Logprob per token with its top k."""
    n = len(tokens)
    if n == 0:
        return []
    rows = logprobs[:n]
    chosen = rows[torch.arange(n), torch.tensor(tokens)].tolist()
    if not k:
        return [Logprob(t, v) for t, v in zip(tokens, chosen, strict=True)]
    values, ids = rows.topk(k, dim=-1)
    return [Logprob(t, v, list(zip(i, tv, strict=True)))
            for t, v, i, tv in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)]


class SampledLogprobs:
    """The log_softmax of the sampled rows of the sequences that asked; rows per sequence as the runner
    returns them (1 + drafted tokens)."""

    def __init__(self, logits: torch.Tensor, seqs: list[Sequence], rows_per_seq: list[int]) -> None:
        self.start: dict[int, int] = {}
        index: list[int] = []
        row = 0
        for i, (seq, n) in enumerate(zip(seqs, rows_per_seq, strict=True)):
            if seq.params.logprobs:
                self.start[i] = len(index)
                index.extend(range(row, row + n))
            row += n
        self.values = torch.log_softmax(logits[index], dim=-1) if index else None

    def take(self, i: int, seq: Sequence, tokens: list[int]) -> list[Logprob] | None:
        if i not in self.start or self.values is None:
            return None
        return logprob_list(self.values[self.start[i] :], tokens, seq.params.top_logprobs)


def add_prompt_logprobs(seq: Sequence, first: int, logits: torch.Tensor) -> None:
    """Rows of positions first, first + 1, ... score prompt tokens first + 1, ...; keep the ones not yet seen
    (a preempted prompt is recomputed)."""
    done = len(seq.prompt_logprobs)
    skip = max(0, done - first)
    if skip >= logits.shape[0]:
        return
    targets = seq.token_ids[first + 1 + skip : first + 1 + logits.shape[0]]
    lp = torch.log_softmax(logits[skip : skip + len(targets)], dim=-1)
    seq.prompt_logprobs.extend(logprob_list(lp, targets, seq.params.top_logprobs))
