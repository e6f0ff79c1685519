"""Batched log-likelihoods from a causal LM: a shared prefix, then many short continuations on its KV cache.

Every local signal is a question about token log-probabilities: of a span of the prefix (the response given
the prompt), of a continuation after it (a probe statement after the story), or of the next token after a
continuation (G-Eval's score digits, a pairwise verdict's "A"/"B"). A `Query` holds one prefix and its
continuations; `LogProbModel.run` packs many queries into padded forward passes:

1. the prefixes of a chunk of queries run once, right-padded, keeping their KV cache;
2. that cache is gathered into one row per continuation (`index_select` on the batch axis) and every
   continuation runs in a second batched pass on top of it, positions continuing after its own prefix.

So a dimension's probes pay for the story once, not once per probe, and many items share passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class Cont:
    tokens: list[int]
    score_from: int = 0  # score tokens[score_from:]; the ones before are context (a question turn)
    next_ids: list[list[int]] | None = None  # report the next-token probability of each group of ids


@dataclass(slots=True)
class Query:
    prefix: list[int]
    span: tuple[int, int] = (0, 0)  # score prefix[start:end] (start >= 1)
    conts: list[Cont] = field(default_factory=list)


@dataclass(slots=True)
class Result:
    span: np.ndarray  # log p of each scored prefix token
    conts: list[np.ndarray]  # log p of each scored continuation token
    nexts: list[list[float]]  # per continuation: probability of each next_ids group (empty when not asked)


def longest_sequence(queries: list[Query]) -> int:
    """Tokens of the longest sequence the queries run: a prefix plus its longest continuation."""
    return max(len(q.prefix) + max([len(c.tokens) for c in q.conts] + [0]) for q in queries)


class LogProbModel:
    """Synchronous batched scorer over a loaded causal LM (the worker's models/engine_model.py LoadedModel)."""

    def __init__(self, loaded: Any, max_batch_tokens: int = 4096, max_batch_rows: int = 16) -> None:
        import torch

        self.torch = torch
        self.model = loaded.model
        self.device = loaded.device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.base = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        pad = loaded.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def run(self, queries: list[Query]) -> list[Result]:
        results: list[Result | None] = [None] * len(queries)
        order = sorted(range(len(queries)), key=lambda i: len(queries[i].prefix))
        chunk: list[int] = []
        with self.torch.inference_mode():
            for i in order:
                longest = max(len(queries[j].prefix) for j in [*chunk, i])
                full = len(chunk) + 1 > self.max_batch_rows or (len(chunk) + 1) * longest > self.max_batch_tokens
                if chunk and full:
                    self._chunk([queries[j] for j in chunk], chunk, results)
                    chunk = []
                chunk.append(i)
            if chunk:
                self._chunk([queries[j] for j in chunk], chunk, results)
        return results  # type: ignore[return-value]

    def _logprobs(self, hidden: Any) -> Any:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = self.softcap * self.torch.tanh(logits / self.softcap)
        return self.torch.log_softmax(logits, dim=-1)

    def _padded(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        torch = self.torch
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _chunk(self, qs: list[Query], where: list[int], results: list[Result | None]) -> None:
        torch, dev = self.torch, self.device
        ids, mask = self._padded([q.prefix for q in qs])
        lp = ids.shape[1]
        pos = torch.arange(lp, device=dev).unsqueeze(0).expand(len(qs), lp)
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        hidden = out.last_hidden_state
        spans = []
        for b, q in enumerate(qs):
            s, e = q.span
            if e > s:
                target = torch.tensor(q.prefix[s:e], device=dev)
                logp = self._logprobs(hidden[b, s - 1: e - 1]).gather(1, target[:, None]).squeeze(1)
                spans.append(logp.cpu().numpy())
            else:
                spans.append(np.zeros(0))
        conts: dict[tuple[int, int], tuple[np.ndarray, list[float]]] = {}
        rows = [(b, c) for b, q in enumerate(qs) for c in range(len(q.conts))]
        if rows:
            last = hidden[torch.arange(len(qs), device=dev), torch.tensor([len(q.prefix) - 1 for q in qs], device=dev)]
            self._continuations(qs, rows, out.cache, mask, last, conts)
        for b, (q, i) in enumerate(zip(qs, where, strict=True)):
            got = [conts[(b, c)] for c in range(len(q.conts))]
            results[i] = Result(spans[b], [g[0] for g in got], [g[1] for g in got])

    def _continuations(self, qs: list[Query], rows: list[tuple[int, int]], cache: Any, mask: Any, last: Any,
                       out: dict[tuple[int, int], tuple[np.ndarray, list[float]]]) -> None:
        from transformers import DynamicCache

        torch, dev = self.torch, self.device
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        lp = mask.shape[1]
        per_pass = max(1, min(self.max_batch_rows * 4, self.max_batch_tokens * 2 // max(lp, 1)))
        for start in range(0, len(rows), per_pass):
            part = rows[start: start + per_pass]
            conts = [qs[b].conts[c] for b, c in part]
            sids, smask = self._padded([c.tokens for c in conts])
            idx = torch.tensor([b for b, _ in part], device=dev)
            spos = torch.tensor([len(qs[b].prefix) for b, _ in part], device=dev)[:, None] + \
                torch.arange(sids.shape[1], device=dev)[None, :]
            kv = DynamicCache(ddp_cache_data=[(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers],
                              config=self.model.config)
            sout = self.base(input_ids=sids, attention_mask=torch.cat([mask.index_select(0, idx), smask], dim=1),
                             position_ids=spos, cache=kv, use_cache=True)
            for r, ((b, c), cont) in enumerate(zip(part, conts, strict=True)):
                n = len(cont.tokens)
                # the hidden state before token j: the prefix's last for j = 0, else the continuation's j-1
                h = torch.cat([last[b][None], sout.last_hidden_state[r, : n]], dim=0)
                logp = np.zeros(0)
                if n > cont.score_from:
                    target = torch.tensor(cont.tokens[cont.score_from:], device=dev)
                    logp = self._logprobs(h[cont.score_from: n]).gather(1, target[:, None]).squeeze(1).cpu().numpy()
                nexts: list[float] = []
                if cont.next_ids:
                    p = self._logprobs(h[n]).exp().cpu()
                    nexts = [float(p[g].sum()) for g in cont.next_ids]
                out[(b, c)] = (logp, nexts)
            del kv, sout
