"""Local judge: rubric scores from the judge model's log-probabilities, by the rubric's method.

- `likelihood`: each dimension's signals (services/judge/signals.py) mapped to [0, 1] by the rubric's
  calibration. One item costs a forward pass over prompt + response (fluency, `end` and every probe's
  statements as continuations on its KV cache), one over the response after a generic prompt (`pmi`) and one
  over its sentences shuffled (`order`).
- `geval`: the judge model's expected score digit after a follow-up question (services/judge/geval.py).

Every item of a batch, whatever its method, goes into one `LogProbModel.run`, so items share passes.
"""

from __future__ import annotations

import math
from typing import Any

from services.common.sampling import InvalidRequest
from services.judge.calibration import pair_probability, sigmoid
from services.judge.conversation import Conversation
from services.judge.geval import GEvalPlan, PairwisePlan, choice_ids
from services.judge.lm import Cont, LogProbModel, Query, Result, longest_sequence
from services.judge.signals import fill, lexicon_rate, prompt_variables, shuffled_sentences
from services.judge.types import CompareItem, DimScore, DimVerdict, ItemScore, PairVerdict, ScoreItem


class LikelihoodPlan:
    """The queries one item needs for the likelihood method, and how their results become scores."""

    def __init__(self, conv: Conversation, item: ScoreItem) -> None:
        self.item = item
        rubric = item.rubric
        head, resp = conv.head(item.prompt), conv.ids(item.response)
        if not resp:
            raise InvalidRequest("response is empty after tokenisation: send the text to judge")
        variables = prompt_variables(item.prompt, rubric.pattern, dict(rubric.defaults))
        self.main = Query(head + resp, (len(head), len(head) + len(resp)))
        self.queries = [self.main]
        self.where: dict[tuple[str, str], Any] = {}  # (dimension, signal) -> where its numbers come from
        for dim in rubric.dimensions:
            for sig in dim.signals:
                key = (dim.name, sig.name)
                if sig.kind == "end":
                    self.where[key] = self._cont(Cont([conv.end_id], 0))
                elif sig.kind == "probe":
                    self.where[key] = [(self._statement(conv, p.question, p.positive, variables),
                                        self._statement(conv, p.question, p.negative, variables)) for p in sig.probes]
                elif sig.kind == "pmi":
                    base = conv.head(sig.baseline)
                    self.where[key] = self._query(Query(base + resp, (len(base), len(base) + len(resp))))
                elif sig.kind == "order":
                    shuffled = shuffled_sentences(item.response)
                    ids = conv.ids(shuffled) if shuffled else []
                    self.where[key] = self._query(Query(head + ids, (len(head), len(head) + len(ids)))) \
                        if shuffled else None

    def _cont(self, cont: Cont) -> int:
        self.main.conts.append(cont)
        return len(self.main.conts) - 1

    def _query(self, query: Query) -> int:
        same = next((i for i, q in enumerate(self.queries) if q.prefix == query.prefix), None)
        if same is not None:
            return same
        self.queries.append(query)
        return len(self.queries) - 1

    def _statement(self, conv: Conversation, question: str, text: str, variables: dict[str, str]) -> int:
        context = conv.post + conv.question(question) if question else []
        return self._cont(Cont(context + conv.ids(fill(text, variables)), len(context)))

    def longest(self) -> int:
        return longest_sequence(self.queries)

    def features(self, results: list[Result]) -> dict[str, dict[str, float]]:
        """Per dimension, each signal's value (higher = better)."""
        main = results[0]
        fluency = float(main.span.mean())
        out: dict[str, dict[str, float]] = {}
        for dim in self.item.rubric.dimensions:
            values = out.setdefault(dim.name, {})
            for sig in dim.signals:
                at = self.where.get((dim.name, sig.name))
                if sig.kind == "fluency":
                    values[sig.name] = fluency
                elif sig.kind == "end":
                    values[sig.name] = float(main.conts[at][0])
                elif sig.kind == "probe":
                    values[sig.name] = sum(float(main.conts[p].sum() - main.conts[n].sum()) for p, n in at) / len(at)
                elif sig.kind in ("pmi", "order"):
                    values[sig.name] = 0.0 if at is None else fluency - float(results[at].span.mean())
                elif sig.kind == "lexicon":
                    values[sig.name] = -lexicon_rate(self.item.response, sig)[0]
        return out

    def finish(self, results: list[Result]) -> ItemScore:
        item, cal = self.item, self.item.rubric.calibration
        scores = []
        for name, values in self.features(results).items():
            dim_cal = cal.dimensions.get(name) if cal else None
            z = dim_cal.logit(values) if dim_cal else sum(values.values())
            shown = ", ".join(f"{k} {v:+.3f}" for k, v in values.items())
            note = "" if dim_cal else " (uncalibrated: run tokenmill judge calibrate)"
            scores.append(DimScore(name, round(sigmoid(z), 6), f"{shown} -> logit {z:+.2f}{note}", round(z, 6)))
        flu = float(results[0].span.mean())
        floor = cal.overall_floor if cal else 0.0
        failed = [f"{s.name} {s.score:.2f}" for s in scores if s.score < floor]
        rationale = f"overall: mean x score/{floor:.2f} for {', '.join(failed)} (under the floor)" if failed else ""
        return ItemScore(id=item.id, scores=scores, rubric=item.rubric.name, backend="local", rationale=rationale,
                         fluency=round(flu, 6) if math.isfinite(flu) else None, floor=floor)


class LocalScorer:
    """Synchronous scorer over a loaded causal LM (the worker's models/engine_model.py LoadedModel)."""

    def __init__(self, loaded: Any, max_batch_tokens: int = 4096, max_batch_rows: int = 16) -> None:
        self.lm = LogProbModel(loaded, max_batch_tokens, max_batch_rows)
        self.conv = Conversation(loaded.tokenizer)
        self.chat = self.conv.chat
        self.context_length = loaded.context_length
        self.choices = choice_ids(self.conv)

    def plan(self, item: ScoreItem) -> Any:
        plan = LikelihoodPlan(self.conv, item) if item.method == "likelihood" else GEvalPlan(self.conv, item)
        self._fits(plan.longest(), "prompt + response")
        return plan

    def _fits(self, tokens: int, what: str) -> None:
        if tokens > self.context_length:
            raise InvalidRequest(f"{what} need {tokens} tokens with the judge's questions, over the judge model's "
                                 f"context of {self.context_length}: shorten the response (or the prompt)")

    def check(self, item: ScoreItem | CompareItem) -> None:
        """Raise InvalidRequest if this item cannot be judged (too long, a scale the tokenizer cannot read)."""
        if isinstance(item, CompareItem):
            for text in (item.first, item.second):
                self.plan(ScoreItem(item.id, item.prompt, text, item.rubric, item.method))
            if item.method == "geval":
                self._fits(PairwisePlan(self.conv, item, self.choices).longest(), "prompt + both responses")
        else:
            self.plan(item)

    def _run(self, plans: list[Any]) -> list[Any]:
        results = self.lm.run([q for p in plans for q in p.queries])
        out, at = [], 0
        for p in plans:
            out.append(p.finish(results[at: at + len(p.queries)]))
            at += len(p.queries)
        return out

    def run(self, items: list[Any]) -> list[Any]:
        """Score items and compare pairs (one order each) in shared passes. A geval pair asks the judge model
        with both responses in view; a likelihood pair scores each response alone and compares the calibrated
        logits (Bradley-Terry), so it has no position to be biased by."""
        plans: list[Any] = []
        alone: dict[tuple[str, str, str], int] = {}  # a response of a likelihood pair, scored once per batch

        def score_alone(it: CompareItem, text: str) -> int:
            key = (it.prompt, text, it.rubric.name)
            if key not in alone:
                alone[key] = len(plans)
                plans.append(self.plan(ScoreItem(it.id, it.prompt, text, it.rubric, it.method)))
            return alone[key]

        where: list[Any] = []
        for it in items:
            if isinstance(it, ScoreItem) or it.method == "geval":
                where.append(len(plans))
                plans.append(self.plan(it) if isinstance(it, ScoreItem) else PairwisePlan(self.conv, it, self.choices))
            else:  # both orders of a pair arrive together: each response is scored once
                where.append((score_alone(it, it.first), score_alone(it, it.second)))
        done = self._run(plans)
        return [verdict_from_scores(done[w[0]], done[w[1]]) if isinstance(w, tuple) else done[w] for w in where]


def verdict_from_scores(a: ItemScore, b: ItemScore) -> PairVerdict:
    """P(a better) per dimension = sigmoid(logit a - logit b); overall from the overall means the same way."""
    dims = [DimVerdict(x.name, round(pair_probability(x.score, y.score), 6),
                       f"score {x.score:.3f} vs {y.score:.3f}") for x, y in zip(a.scores, b.scores, strict=True)]
    overall = pair_probability(a.overall, b.overall)
    return PairVerdict(dims, round(overall, 6), a.backend,
                       f"overall {a.overall:.3f} vs {b.overall:.3f} (each response scored alone)")
