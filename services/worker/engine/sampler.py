"""Next-token choice for a batch: greedy rows by argmax, the rest by temperature / top-k / top-p.

Vectorised over rows; only the uniform draw is per row, from the request's own
torch.Generator when it set a seed, so a seeded request samples the same tokens
whatever else shares its batch (inverse-CDF sampling: one uniform per token).
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
        probs, order = self._probs(logits, seqs)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor([self.uniform(s) for s in seqs], device=logits.device, dtype=cdf.dtype)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=logits.shape[-1] - 1)
        return (order.gather(1, pick) if order is not None else pick)[:, 0]

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
