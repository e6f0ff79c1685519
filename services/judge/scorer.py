"""Local LLM-as-a-judge: G-Eval-style probability-weighted rubric scores plus a fluency signal.

For each (prompt, response) the judge model reads a conversation in its own chat template:

    user:       <prompt>
    assistant:  <response>                      <- shared prefix, one forward pass per item
    user:       Score your answer above from 1 to 5 for <dimension>: <description> Reply with just the number.
    assistant:  ▌                               <- per dimension: next-token distribution here

The score of a dimension is the expected value of the scale under the next-token distribution
restricted to the scale's digits (G-Eval, Liu et al. 2023), normalised to [0, 1]. This uses the whole
distribution instead of one sampled digit, so it is deterministic and smooth.

The shared prefix is the conversation as the serving stack renders it for generation, so the same forward
pass also yields the judge model's mean token log-likelihood of the response given the prompt: `fluency`
(nats per token, <= 0; higher is more fluent and more on-prompt).

Batching: prefixes of many items run in one padded forward pass; their KV cache is then gathered into
one row per (item, dimension) and every dimension's question runs in a second batched pass on top of it.
So one item with four dimensions costs one prefix plus four short suffixes, and many items share passes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from services.common.sampling import InvalidRequest
from services.judge.rubrics import Dimension
from services.judge.types import DimScore, ItemScore, ScoreItem

log = logging.getLogger("tokenmill.judge.scorer")

QUESTION = "Score your answer above from {lo} to {hi} for {title}: {description} Reply with just the number."
ANSWER_PREFIX = ""
PLAIN_PREFIX = "Instruction: {prompt}\n\nResponse: "
PLAIN_SUFFIX = "\n\nQuestion: {question}\nAnswer: "
_P, _R, _Q = "\x00TM_PROMPT\x00", "\x00TM_RESPONSE\x00", "\x00TM_QUESTION\x00"


@dataclass(slots=True)
class _Encoded:
    prefix: list[int]
    resp_start: int
    resp_end: int
    suffixes: list[list[int]]


class LocalScorer:
    """Synchronous scorer over a loaded causal LM (services.common.model_loader.LoadedModel)."""

    def __init__(self, loaded: Any, max_batch_tokens: int = 4096, max_batch_rows: int = 16,
                 question: str = QUESTION, answer_prefix: str = ANSWER_PREFIX) -> None:
        import torch

        self.torch = torch
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.device = loaded.device
        self.context_length = loaded.context_length
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.question = question
        self.answer_prefix = answer_prefix
        self.base = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self._digits: dict[tuple[int, int], list[list[int]]] = {}
        self._build_templates()

    # ----------------------------------------------------------------- encoding
    def _build_templates(self) -> None:
        """Split the chat template into fixed text around the prompt, the response and the question."""
        self.chat = False
        if getattr(self.tok, "chat_template", None):
            conv = [{"role": "user", "content": _P}, {"role": "assistant", "content": _R}]
            try:
                first = self.tok.apply_chat_template(conv, tokenize=False)
                full = self.tok.apply_chat_template([*conv, {"role": "user", "content": _Q}], tokenize=False,
                                                    add_generation_prompt=True)
            except Exception as exc:  # a template that rejects this shape: use the plain one
                log.warning("chat template unusable for judging (%s); using a plain template", exc)
            else:
                if (full.startswith(first) and first.count(_P) == 1 and first.count(_R) == 1
                        and first.index(_P) < first.index(_R) and full[len(first):].count(_Q) == 1):
                    self.chat = True
                    self.t_pre, rest = first.split(_P)
                    self.t_mid, self.t_post = rest.split(_R)
                    self.t_suffix = full[len(first):] + self.answer_prefix
        if not self.chat:
            bos = self.tok.bos_token or ""
            self.t_pre, self.t_mid, self.t_post = bos + "Instruction: ", "\n\nResponse: ", ""
            self.t_suffix = PLAIN_SUFFIX.replace("{question}", _Q)
        self._pre_ids = self._ids(self.t_pre)
        self._post_ids = self._ids(self.t_post)

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def digit_ids(self, dim: Dimension) -> list[list[int]]:
        """Token ids that spell each scale value (bare and with a leading space) as one token."""
        key = (dim.scale_min, dim.scale_max)
        if key not in self._digits:
            ids = []
            for v in range(dim.scale_min, dim.scale_max + 1):
                forms = [t for t in (self._ids(str(v)), self._ids(" " + str(v))) if len(t) == 1]
                if not forms:
                    raise InvalidRequest(
                        f"dimension {dim.name!r}: the local judge reads one token per scale value and its tokenizer "
                        f"spells {v} in several tokens; use a scale within 0..9 (e.g. 1..5)")
                ids.append(sorted({t[0] for t in forms}))
            self._digits[key] = ids
        return self._digits[key]

    def question_text(self, dim: Dimension) -> str:
        return self.question.format(title=dim.title, description=dim.description.rstrip(),
                                    lo=dim.scale_min, hi=dim.scale_max)

    def encode(self, item: ScoreItem) -> _Encoded:
        """Token ids of the shared prefix (with the response span) and of each dimension's suffix."""
        head = self._ids(self.t_pre + item.prompt + self.t_mid)
        resp = self._ids(item.response)
        prefix = head + resp + self._post_ids
        suffixes = []
        for dim in item.rubric.dimensions:
            self.digit_ids(dim)
            suffixes.append(self._ids(self.t_suffix.replace(_Q, self.question_text(dim))))
        total = len(prefix) + max(len(s) for s in suffixes)
        if total > self.context_length:
            raise InvalidRequest(
                f"prompt + response are {len(prefix)} tokens for the judge model, over its context of "
                f"{self.context_length} with the rubric question: shorten the response (or the prompt)")
        if not resp:
            raise InvalidRequest("response is empty after tokenisation: send the text to judge")
        # The questions start alike ("<user> Score your answer above from 1 to 5 for"): run that once, in the prefix.
        common = 0
        if len(suffixes) > 1:
            shortest = min(len(s) for s in suffixes)
            while common < shortest - 1 and all(s[common] == suffixes[0][common] for s in suffixes):
                common += 1
        return _Encoded(prefix + suffixes[0][:common], len(head), len(head) + len(resp),
                        [s[common:] for s in suffixes])

    def check(self, item: ScoreItem) -> None:
        """Raise InvalidRequest if this item cannot be scored (too long, a scale the tokenizer cannot read)."""
        self.encode(item)

    # ----------------------------------------------------------------- scoring
    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        torch = self.torch
        encoded = [self.encode(it) for it in items]
        results: list[ItemScore | None] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(encoded[i].prefix))
        chunk: list[int] = []
        with torch.inference_mode():
            for i in order:
                longest = max([len(encoded[j].prefix) for j in chunk] + [len(encoded[i].prefix)])
                if chunk and (len(chunk) + 1 > self.max_batch_rows
                              or (len(chunk) + 1) * longest > self.max_batch_tokens):
                    self._score_chunk(chunk, items, encoded, results)
                    chunk = []
                chunk.append(i)
            if chunk:
                self._score_chunk(chunk, items, encoded, results)
        return results  # type: ignore[return-value]

    def _logits(self, hidden: Any) -> Any:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = self.softcap * self.torch.tanh(logits / self.softcap)
        return logits

    def _score_chunk(self, chunk: list[int], items: list[ScoreItem], encoded: list[_Encoded],
                     results: list[ItemScore | None]) -> None:
        from transformers import DynamicCache

        torch = self.torch
        dev = self.device
        encs = [encoded[i] for i in chunk]
        lp = max(len(e.prefix) for e in encs)
        ids = torch.full((len(encs), lp), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), lp), dtype=torch.long)
        for b, e in enumerate(encs):
            ids[b, : len(e.prefix)] = torch.tensor(e.prefix)
            mask[b, : len(e.prefix)] = 1
        pos = torch.arange(lp).unsqueeze(0).expand(len(encs), lp)
        out = self.base(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                        use_cache=True)
        hidden, cache = out.last_hidden_state, out.cache

        # fluency: mean log p(response token | everything before it)
        fluency = []
        for b, e in enumerate(encs):
            h = hidden[b, e.resp_start - 1: e.resp_end - 1]
            target = torch.tensor(e.prefix[e.resp_start: e.resp_end], device=dev)
            logp = torch.log_softmax(self._logits(h), dim=-1).gather(1, target[:, None]).squeeze(1)
            fluency.append(float(logp.mean()))

        # one row per (item, dimension): the item's prefix KV plus the dimension's question
        rows = [(b, d) for b, e in enumerate(encs) for d in range(len(e.suffixes))]
        probs: dict[tuple[int, int], list[float]] = {}
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        per_chunk = max(1, min(self.max_batch_rows * 2, self.max_batch_tokens * 2 // max(lp, 1)))
        for start in range(0, len(rows), per_chunk):
            part = rows[start: start + per_chunk]
            ls = max(len(encs[b].suffixes[d]) for b, d in part)
            idx = torch.tensor([b for b, _ in part], device=dev)
            sids = torch.full((len(part), ls), self.pad_id, dtype=torch.long)
            smask = torch.zeros((len(part), ls), dtype=torch.long)
            for r, (b, d) in enumerate(part):
                s = encs[b].suffixes[d]
                sids[r, : len(s)] = torch.tensor(s)
                smask[r, : len(s)] = 1
            spos = torch.tensor([len(encs[b].prefix) for b, _ in part])[:, None] + torch.arange(ls)[None, :]
            kv = DynamicCache(ddp_cache_data=[(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers],
                              config=self.model.config)
            full_mask = torch.cat([mask.to(dev).index_select(0, idx), smask.to(dev)], dim=1)
            sout = self.base(input_ids=sids.to(dev), attention_mask=full_mask, position_ids=spos.to(dev),
                             cache=kv, use_cache=True)
            last = torch.tensor([len(encs[b].suffixes[d]) - 1 for b, d in part], device=dev)
            h = sout.last_hidden_state[torch.arange(len(part), device=dev), last]
            p = torch.softmax(self._logits(h), dim=-1).cpu()
            for r, (b, d) in enumerate(part):
                dim = items[chunk[b]].rubric.dimensions[d]
                probs[(b, d)] = [float(p[r, ids_v].sum()) for ids_v in self.digit_ids(dim)]
            del kv, sout

        for b, i in enumerate(chunk):
            item = items[i]
            scores = []
            for d, dim in enumerate(item.rubric.dimensions):
                pv = probs[(b, d)]
                mass = sum(pv)
                values = range(dim.scale_min, dim.scale_max + 1)
                expected = sum(v * p for v, p in zip(values, pv, strict=True)) / mass if mass > 0 else \
                    (dim.scale_min + dim.scale_max) / 2
                scores.append(DimScore(dim.name, round(dim.normalise(expected), 6),
                                       f"expected {expected:.2f} on {dim.scale_min}..{dim.scale_max} "
                                       f"(digit mass {mass:.2f})"))
            flu = fluency[b]
            results[i] = ItemScore(id=item.id, scores=scores, rubric=item.rubric.name, backend="local",
                                   fluency=round(flu, 6) if math.isfinite(flu) else None)
