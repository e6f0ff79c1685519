"""Next-token choice for a batch: greedy rows by argmax, the rest by temperature / top-k / top-p.

Sampling is the exponential race (as vLLM samples): token = argmax(p / q) with q ~ Exp(1) drawn per
vocabulary entry (as -log u, u uniform) from the request's own torch.Generator when it set a seed. That picks
token i with probability p_i, and a seeded request gets the same tokens whatever else shares its batch: a
float-noise change of p (another batch shape) flips the choice only where two ratios tie, whereas walking the
cumulative distribution flips whenever the draw lands near any boundary. Top-k and top-p look for the head
they keep among each row's 256 most likely tokens (torch.topk), then 4,096, and sort a row whole only when its
top-p head is longer still: a full sort of the vocabulary cost more than the model's forward at 32 rows on a CPU.

Before any of that, `process_logits` applies the logit processors of the rows that ask (the rest pay nothing),
in vLLM's order: logit_bias, min_tokens (EOS and stop ids masked), bad_words, then the penalties —
repetition (CTRL / transformers: over prompt + generated tokens, a positive logit divided by it, a negative
one multiplied), frequency and presence (OpenAI: over generated tokens, logit -= count * frequency +
presence). They change the argmax too, so greedy rows get them. min_p filters after temperature, with top-k
and top-p. Each sequence keeps its counts up to date incrementally (`PenaltyState`), and the updates touch
only the tokens that occurred, so a step costs O(distinct tokens) per penalised row, not O(vocabulary).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from services.worker.engine.layers import kernels
from services.worker.engine.sequence import Sequence

NEG_INF = float("-inf")


@dataclass(slots=True)
class PenaltyState:
    """A sequence's token statistics for its penalties, advanced with the tokens it generates."""

    prompt_ids: list[int]  # the prompt's distinct tokens
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times generated
    counted: int = 0  # generated tokens already in counts
    bad_words: list[list[int]] = field(default_factory=list)  # token ids of each bad word (all spellings)

    def update(self, seq: Sequence) -> None:
        out = seq.token_ids[seq.num_prompt_tokens + self.counted :]
        for t in out:
            self.counts[t] = self.counts.get(t, 0) + 1
        self.counted += len(out)


def penalty_state(seq: Sequence) -> PenaltyState:
    state = seq.penalties
    if state is None:
        p = seq.params
        prompt = sorted(set(seq.token_ids[: seq.num_prompt_tokens])) if p.repetition_penalty != 1.0 else []
        state = seq.penalties = PenaltyState(prompt)
    state.update(seq)
    return state


@torch.inference_mode()  # the runner's logits are inference tensors
def process_logits(logits: torch.Tensor, rows: list[tuple[int, Sequence]]) -> None:
    """Apply the logit processors of each (row, sequence) in place: one row per sequence (no drafts). The
    penalties' token ids go to torch through array buffers and their per-row values by repeat_interleave:
    torch.tensor over a Python list of thousands of numbers costs ~8x more, most of this function's time."""
    vocab = logits.shape[-1]
    rep = _Rows()  # repetition: (row, penalty) over the prompt's and the output's distinct tokens
    pen = _Rows()  # frequency / presence: (row, frequency, presence) over the output's tokens, with their counts
    counts: list[int] = []
    masked_r: list[int] = []
    masked_t: list[int] = []
    for row, seq in rows:
        p = seq.params
        state = penalty_state(seq)
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            logits[row, ids] += torch.tensor([p.logit_bias[t] for t in ids], dtype=logits.dtype, device=logits.device)
        if seq.num_output_tokens < p.min_tokens:
            stops = [t for t in seq.stop_ids if t < vocab]
            masked_r += [row] * len(stops)
            masked_t += stops
        out = seq.output_token_ids
        for word in state.bad_words:
            if len(word) <= len(out) + 1 and (len(word) == 1 or out[len(out) - len(word) + 1 :] == word[:-1]):
                masked_r.append(row)
                masked_t.append(word[-1])
        if p.repetition_penalty != 1.0:
            rep.add(row, set(state.prompt_ids).union(state.counts) if state.counts else state.prompt_ids,
                    p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and state.counts:
            pen.add(row, state.counts, p.frequency_penalty, p.presence_penalty)
            counts.extend(state.counts.values())
    dev = logits.device
    if rep.ids:
        r, t, (penalty,) = rep.tensors(logits)
        values = logits[r, t]
        logits[r, t] = torch.where(values < 0, values * penalty, values / penalty)
    if pen.ids:
        r, t, (frequency, presence) = pen.tensors(logits)
        logits[r, t] -= _int64(counts).to(dev, logits.dtype) * frequency + presence
    if masked_r:
        logits[torch.tensor(masked_r, device=dev), torch.tensor(masked_t, device=dev)] = NEG_INF


class _Rows:
    """Token ids of several rows, flattened, with each row's index and values once per row."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.lens: list[int] = []
        self.values: list[tuple[float, ...]] = []
        self.ids: list[int] = []

    def add(self, row: int, ids: Iterable[int], *values: float) -> None:
        before = len(self.ids)
        self.ids.extend(ids)
        self.rows.append(row)
        self.lens.append(len(self.ids) - before)
        self.values.append(values)

    def tensors(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(row of each id, the ids, each value column repeated per id) on the logits' device."""
        dev, lens = logits.device, torch.tensor(self.lens)
        per_id = [torch.repeat_interleave(torch.tensor(col, dtype=logits.dtype), lens).to(dev)
                  for col in zip(*self.values, strict=True)]
        return torch.repeat_interleave(torch.tensor(self.rows), lens).to(dev), _int64(self.ids).to(dev), per_id


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of ties), as torch.argmax; the C++ kernel's ~4x faster pass on a CPU."""
    ops = kernels.cpu_ops(logits.device, logits.dtype)
    return ops.argmax_rows(logits.contiguous()) if ops is not None and logits.dim() == 2 else logits.argmax(dim=-1)


def _int64(values: list[int]) -> torch.Tensor:
    return torch.frombuffer(array("q", values), dtype=torch.int64)


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [rows, vocab] float32, one row per sequence; returns one token id per row."""
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if len(rows) == len(seqs):  # no greedy row: no argmax over the whole batch's logits
            return self._sample(logits, seqs).tolist()
        choice = greedy(logits)
        if rows:
            picked = self._sample(logits[rows], [seqs[i] for i in rows])
            choice[torch.tensor(rows, device=logits.device)] = picked
        return choice.tolist()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        probs = self.distribution(logits, seqs)
        return torch.stack([self.race(p, s) for p, s in zip(probs, seqs, strict=True)])

    def race(self, probs: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """One token from an (unnormalised) distribution over the vocabulary: argmax(p / q), q ~ Exp(1) drawn as
        -log(u) from one uniform u per vocabulary entry (a uniform costs a sixth of an exponential draw on a CPU,
        and the log is taken only where p > 0, which top-k / top-p leave few)."""
        u = torch.rand(probs.shape[-1], generator=seq.generator or self.generator)
        kept = probs.nonzero().squeeze(-1)
        q = -torch.log(u[kept.cpu()]).to(probs.device)
        return kept[(probs[kept].float() / q).argmax()]

    def uniform(self, seq: Sequence) -> float:
        """One draw from the request's own generator when it set a seed."""
        return float(torch.rand((), generator=seq.generator or self.generator))

    def distribution(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The sampling distribution of each row after temperature / min-p / top-k / top-p, in vocabulary order
        (unnormalised where top-p cut mass: divide by the row sum)."""
        dev, vocab = logits.device, logits.shape[-1]
        temps = torch.tensor([s.params.temperature for s in seqs], device=dev)
        logits = logits / temps[:, None]
        min_p = [s.params.min_p for s in seqs]
        if max(min_p) > 0.0:  # drop tokens below min_p x the top token's probability (after temperature)
            probs = logits.softmax(dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=dev)[:, None]
            logits = logits.masked_fill(probs < floor, NEG_INF)
        top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        cut = [i for i in range(len(seqs)) if top_k[i] < vocab or top_p[i] < 1.0]
        if not cut:
            return logits.softmax(dim=-1)
        probs = torch.zeros_like(logits)
        if plain := [i for i in range(len(seqs)) if top_k[i] == vocab and top_p[i] == 1.0]:
            probs[plain] = logits[plain].softmax(dim=-1)
        rows, ks, ps = logits[cut], [top_k[i] for i in cut], [top_p[i] for i in cut]
        log_total = rows.logsumexp(dim=-1)
        # top-k / top-p keep the head of each row sorted by probability: look for it among the most likely
        # CANDIDATES tokens (torch.topk; sorting the whole vocabulary costs ~20x more), then 16x as many for the
        # rows whose top-p head turns out longer (a flat distribution; penalties flatten some), then sort
        width = min(vocab, max([CANDIDATES] + [k for k in ks if k < vocab]))
        head, fits = _head(*rows.topk(width, dim=-1), ks, ps, log_total, vocab)
        left = [j for j, ok in enumerate(fits) if not ok]
        while left:
            width = vocab if width * 16 >= vocab else width * 16
            sub = rows[left]
            head[left], fits = _head(*(sub.topk(width, dim=-1) if width < vocab else sub.sort(dim=-1, descending=True)),
                                     [ks[j] for j in left], [ps[j] for j in left], log_total[left], vocab)
            left = [j for j, ok in zip(left, fits, strict=True) if not ok]
        probs[cut] = head
        return probs


CANDIDATES = 256  # tokens per row top-k / top-p look among before sorting a row whole


def _head(values: torch.Tensor, order: torch.Tensor, top_k: list[int], top_p: list[float], log_total: torch.Tensor,
          vocab: int) -> tuple[torch.Tensor, list[bool]]:
    """Top-k, then top-p (on the top-k renormalised, as transformers' warpers chain), over each row's most likely
    tokens: `values` their logits sorted descending, `order` their ids, `log_total` the logsumexp of the whole row.
    Returns the kept probabilities in vocabulary order and, per row, whether its head fits these columns (true for
    a top-k row; for top-p alone, when the columns hold top_p of the mass)."""
    dev, width = values.device, values.shape[-1]
    ks = torch.tensor(top_k, device=dev)
    has_k = ks < vocab
    if bool(has_k.any()):
        values = values.masked_fill(torch.arange(width, device=dev)[None, :] >= ks[:, None], NEG_INF)
        log_total = torch.where(has_k, values.logsumexp(dim=-1), log_total)
    probs = (values - log_total[:, None]).exp()
    fits = [True] * len(top_k) if width == vocab else has_k.tolist()
    if min(top_p) < 1.0:
        mass = probs.cumsum(dim=-1)
        cut = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], device=dev)  # 1 = off (float sums)
        probs.masked_fill_(mass - probs >= cut[:, None], 0.0)  # the top token always stays
        fits = [f or m >= p for f, m, p in zip(fits, mass[:, -1].tolist(), top_p, strict=True)]
    return torch.zeros(len(top_k), vocab, dtype=probs.dtype, device=dev).scatter_(1, order, probs), fits
