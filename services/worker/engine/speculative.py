"""Speculative decoding: draft tokens per sequence, verify them all in the engine's one packed forward,
keep the longest accepted prefix plus one token of the target's own.

Drafts:
- ngram (prompt lookup): the continuation of the latest earlier occurrence of the sequence's last n tokens
  (n = max_ngram down to 1) in its own prompt and output. Free; strong when the answer repeats the input.
- draft (self-speculative): the target's first N layers + its final norm and LM head, greedy, K passes
  batched over the sequences. Those layers' K/V equal the target's, so the draft needs no cache of its own.
Acceptance: a greedy request keeps drafts while they equal the target's argmax. A sampled request uses
rejection sampling with a point-mass proposal (both drafts are deterministic): keep draft x with
probability p(x), else draw from p without x, renormalised, and stop; when all K are kept, draw one more
from p. The output distribution is the target's (Leviathan et al. 2023, with q one-hot at the draft).
When (per step and sequence): a step of n tokens costs about a + b*n (a: reading the weights and the
per-layer overhead, b: each token's own compute; `token_cost` = b / a: 0.30 measured by `tokenmill bench
speculative` on the native step over the GGUF's 4-bit blocks, 2-core CPU, 1 thread, the least loaded of five
runs (0.14-0.30: other processes slow the fixed part most); it was 0.06 on the fp32 step).
A sequence's K drafts add K*b and bring rate*K accepted tokens, where rate = (accepted + 1) / (drafted + 2)
is its own acceptance so far; with n sequences decoding a token costs (a + b*n) / n, so drafting pays while
rate >= b*n / (a + b*n) = token_cost*n / (1 + token_cost*n): about 0.23 at n = 1, 0.71 at 8, 0.91 at 32.
The self-draft's own passes cost more, so it also needs rate >= `min_acceptance` (default 0.6). A sequence
below its floor probes one drafted token every PROBE_EVERY decode steps; `max_batch` caps n outright.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.worker.engine.sampler import Sampler, greedy
from services.worker.engine.sequence import Sequence

METHODS = ("off", "ngram", "draft")
PLACEHOLDER = -1  # a draft slot the draft model fills once the scheduler has given it KV room
MIN_ACCEPTANCE = {"ngram": 0.0, "draft": 0.6, "off": 1.0}  # defaults of --speculative-min-acceptance
PROBE_EVERY = 16


@dataclass(slots=True)
class SpecConfig:
    method: str = "off"
    num_tokens: int = 4  # K: most drafted tokens per sequence and step
    draft_layers: int = 0  # draft: the target's first N layers; 0 = a quarter of them
    max_batch: int = 64  # speculate only while at most this many sequences decode
    min_acceptance: float = -1.0  # a sequence drafts while its acceptance rate is at least this; < 0: per mode
    token_cost: float = 0.3  # b / a of the step cost model a + b * tokens (see the module docstring)
    max_ngram: int = 3

    def validate(self, num_layers: int) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--speculative {self.method!r}: use one of {', '.join(METHODS)}")
        if self.num_tokens < 1 or self.max_batch < 0:
            raise ValueError("--num-speculative-tokens must be >= 1 and --speculative-max-batch >= 0")
        if self.method == "draft" and not 0 < self.layers(num_layers) < num_layers:
            raise ValueError(f"--draft-layers {self.draft_layers}: the model has {num_layers} layers; "
                             f"a self-speculative draft uses between 1 and {num_layers - 1}")

    def layers(self, num_layers: int) -> int:
        return self.draft_layers or max(1, num_layers // 4)

    def acceptance_floor(self) -> float:
        return self.min_acceptance if self.min_acceptance >= 0 else MIN_ACCEPTANCE[self.method]


def ngram_draft(tokens: list[int], k: int, max_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


class Speculator:
    def __init__(self, cfg: SpecConfig, runner: Any, max_model_len: int) -> None:
        cfg.validate(runner.num_layers)
        self.cfg, self.runner, self.max_model_len = cfg, runner, max_model_len
        self.draft_layers = cfg.layers(runner.num_layers)
        self.floor = cfg.acceptance_floor()
        self.num_draft_tokens = 0  # cumulative, for metrics
        self.num_accepted_tokens = 0

    def propose(self, running: list[Sequence]) -> None:
        """Before scheduling: set each decoding sequence's drafts (placeholders in draft mode), or none when
        too many sequences decode for speculation to pay."""
        decoding = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        n = len(decoding)
        on = n <= self.cfg.max_batch
        floor = max(self.floor, self.cfg.token_cost * n / (1 + self.cfg.token_cost * n))
        for seq in decoding:
            k = min(self._budget(seq, floor), seq.params.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - seq.num_tokens - 1) if on else 0
            # constrained, penalised and parallel-sampling requests do not speculate (their rows are processed
            # or ranked per generated token)
            if k <= 0 or seq.matcher is not None or seq.penalties is not None or seq.group is not None:
                seq.spec_token_ids = []
            elif self.cfg.method == "ngram":
                seq.spec_token_ids = ngram_draft(seq.token_ids, k, self.cfg.max_ngram)
            else:
                seq.spec_token_ids = [PLACEHOLDER] * k

    def _budget(self, seq: Sequence, floor: float) -> int:
        """K while the sequence's drafts pay; below the floor none, and a one-token probe every PROBE_EVERY
        decode steps (cheap, and enough to lift the rate when the text turns predictable)."""
        if (seq.spec_accepted + 1) / (seq.spec_drafted + 2) >= floor:
            return self.cfg.num_tokens
        seq.spec_idle_steps += 1
        if seq.spec_idle_steps < PROBE_EVERY:
            return 0
        seq.spec_idle_steps = 0
        return 1

    def fill(self, scheduled: list[Sequence]) -> None:
        """After scheduling (draft mode): run the draft passes, one batched token per sequence each."""
        seqs = sorted((s for s in scheduled if s.spec_token_ids and s.spec_token_ids[0] == PLACEHOLDER),
                      key=lambda s: -s.num_computed_tokens)
        last = [s.token_ids[-1] for s in seqs]
        for j in range(max((len(s.spec_token_ids) for s in seqs), default=0)):
            active = [i for i, s in enumerate(seqs) if len(s.spec_token_ids) > j]
            drafted = self.runner.draft([last[i] for i in active], [seqs[i].num_computed_tokens + j for i in active],
                                        [seqs[i].block_table for i in active], self.draft_layers).tolist()
            for i, tok in zip(active, drafted, strict=True):
                seqs[i].spec_token_ids[j] = last[i] = tok

    def accept(self, logits: torch.Tensor, seqs: list[Sequence], sampler: Sampler) -> list[list[int]]:
        """logits has 1 + len(spec_token_ids) rows per sequence; returns the tokens each one keeps."""
        argmax = greedy(logits).tolist()
        out: list[list[int]] = []
        plain: list[tuple[int, int]] = []  # (index, row) of sampled sequences without drafts: one batched draw
        row = 0
        for i, seq in enumerate(seqs):
            drafts, k = seq.spec_token_ids, len(seq.spec_token_ids)
            if seq.params.greedy:
                a = next((j for j in range(k) if drafts[j] != argmax[row + j]), k)
                out.append([*drafts[:a], argmax[row + a]])
            elif not k:
                out.append([])
                plain.append((i, row))
            else:
                out.append(self._rejection_sample(logits[row : row + k + 1], seq, sampler))
            if k:
                accepted = len(out[-1]) - 1
                seq.spec_drafted += k
                seq.spec_accepted += accepted
                self.num_draft_tokens += k
                self.num_accepted_tokens += accepted
            row += k + 1
        if plain:
            rows = torch.tensor([r for _, r in plain], device=logits.device)
            for (i, _), tok in zip(plain, sampler(logits[rows], [seqs[i] for i, _ in plain]), strict=True):
                out[i] = [tok]
        return out

    @staticmethod
    def _rejection_sample(logits: torch.Tensor, seq: Sequence, sampler: Sampler) -> list[int]:
        probs = sampler.distribution(logits, [seq] * logits.shape[0])
        probs = probs / probs.sum(dim=-1, keepdim=True)
        kept: list[int] = []
        for j, x in enumerate(seq.spec_token_ids):
            p = probs[j]
            if sampler.uniform(seq) < float(p[x]):
                kept.append(x)
                continue
            residual = p.clone()
            residual[x] = 0.0
            if float(residual.sum()) <= 0.0:  # p(x) was 1 up to rounding: x is the only choice
                kept.append(x)
                continue
            return [*kept, int(sampler.race(residual, seq))]
        return [*kept, int(sampler.race(probs[-1], seq))]
