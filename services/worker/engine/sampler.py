"""Next-token choice for a batch: greedy rows by argmax, the rest by temperature / top-k / top-p.

Sampling is the exponential race (as vLLM samples): token = argmax(p / q) with q ~ Exp(1) drawn per
vocabulary entry from the request's own torch.Generator when it set a seed. That picks token i with
probability p_i, and a seeded request gets the same tokens whatever else shares its batch: a float-noise
change of p (another batch shape) flips the choice only where two ratios tie, whereas walking the
cumulative distribution flips whenever the draw lands near any boundary.
"""

from __future__ import annotations

import torch

from services.worker.engine.sequence import Sequence


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [rows, vocab] float32, one row per sequence; returns one token id per row."""
        choice = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            picked = self._sample(logits[rows], [seqs[i] for i in rows])
            choice[torch.tensor(rows, device=logits.device)] = picked
        return choice.tolist()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        probs = self.distribution(logits, seqs)
        return torch.stack([self.race(p, s) for p, s in zip(probs, seqs, strict=True)])

    def race(self, probs: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """One token from an (unnormalised) distribution over the vocabulary: argmax(p / q), q ~ Exp(1)."""
        q = torch.empty(probs.shape[-1], dtype=torch.float32).exponential_(generator=seq.generator or self.generator)
        return (probs.float() / q.to(probs.device)).argmax()

    def uniform(self, seq: Sequence) -> float:
        """One draw from the request's own generator when it set a seed."""
        return float(torch.rand((), generator=seq.generator or self.generator))

    def distribution(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The sampling distribution of each row after temperature / top-k / top-p, in vocabulary order
        (unnormalised where top-p cut mass: divide by the row sum)."""
        probs, order = self._probs(logits, seqs)
        return probs if order is None else torch.empty_like(probs).scatter_(1, order, probs)

    def _probs(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev, vocab = logits.device, logits.shape[-1]
        temps = torch.tensor([s.params.temperature for s in seqs], device=dev)
        logits = logits / temps[:, None]
        top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        order = None
        if min(top_k) < vocab or min(top_p) < 1.0:
            logits, order = logits.sort(dim=-1, descending=True)
            if min(top_k) < vocab:
                ranks = torch.arange(vocab, device=dev)
                logits.masked_fill_(ranks[None, :] >= torch.tensor(top_k, device=dev)[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        if min(top_p) < 1.0:
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token; the top token always stays
            probs.masked_fill_(before >= torch.tensor(top_p, device=dev)[:, None], 0.0)
        return probs, order
