"""G-Eval on the local judge model: scores and pairwise verdicts read off a next-token distribution.

- Score: the judge model reads the conversation, then a follow-up question per dimension ("Score your answer
  above from 1 to 5 for moral clarity: ... Reply with just the number."); the score is the expected value of
  the scale under the next-token distribution restricted to the scale's digits (Liu et al. 2023),
  normalised to [0, 1]. Meaningful with a capable judge; the 135M embedded model sits near its prior.
- Compare: the prompt and both responses in one user turn, then per dimension "Which response is better
  for ...? Answer with just A or B."; P(first better) = P("A") / (P("A") + P("B")). The caller evaluates
  both orders and averages, as MT-Bench and AlpacaEval do, because small judges favour a position.
"""

from __future__ import annotations

from services.common.sampling import InvalidRequest
from services.judge.conversation import Conversation
from services.judge.lm import Cont, Query, Result, longest_sequence
from services.judge.rubrics import Dimension
from services.judge.types import CompareItem, DimScore, DimVerdict, ItemScore, PairVerdict, ScoreItem

QUESTION = "Score your answer above from {lo} to {hi} for {title}: {description} Reply with just the number."
PAIR_BODY = "Here is a request and two responses to it.\n\nRequest: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
PAIR_QUESTION = "Which response is better for {title}: {description} Answer with just A or B."


def single_token_ids(conv: Conversation, text: str) -> list[int]:
    """Ids of the text spelled as one token, bare or after a space (tokenised once per conversation)."""
    ids = conv.singles.get(text)
    if ids is None:
        ids = conv.singles[text] = sorted({t[0] for t in (conv.ids(text), conv.ids(" " + text)) if len(t) == 1})
    return ids


def digit_ids(conv: Conversation, dim: Dimension) -> list[list[int]]:
    ids = []
    for v in range(dim.scale_min, dim.scale_max + 1):
        forms = single_token_ids(conv, str(v))
        if not forms:
            raise InvalidRequest(
                f"dimension {dim.name!r}: the local judge reads one token per scale value and its tokenizer "
                f"spells {v} in several tokens; use a scale within 0..9 (e.g. 1..5)")
        ids.append(forms)
    return ids


def choice_ids(conv: Conversation) -> list[list[int]]:
    return [single_token_ids(conv, "A"), single_token_ids(conv, "B")]


class GEvalPlan:
    def __init__(self, conv: Conversation, item: ScoreItem) -> None:
        self.item = item
        head, resp = conv.head(item.prompt), conv.ids(item.response)
        if not resp:
            raise InvalidRequest("response is empty after tokenisation: send the text to judge")
        conts = []
        for dim in item.rubric.dimensions:
            q = conv.question(QUESTION.format(lo=dim.scale_min, hi=dim.scale_max, title=dim.title,
                                              description=dim.description.rstrip()))
            conts.append(Cont(q, len(q), digit_ids(conv, dim)))
        self.queries = [Query(head + resp + conv.post, (len(head), len(head) + len(resp)), conts)]

    def longest(self) -> int:
        return longest_sequence(self.queries)

    def finish(self, results: list[Result]) -> ItemScore:
        res, scores = results[0], []
        for dim, probs in zip(self.item.rubric.dimensions, res.nexts, strict=True):
            mass = sum(probs)
            values = range(dim.scale_min, dim.scale_max + 1)
            expected = sum(v * p for v, p in zip(values, probs, strict=True)) / mass if mass > 0 else \
                (dim.scale_min + dim.scale_max) / 2
            scores.append(DimScore(dim.name, round(dim.normalise(expected), 6),
                                   f"expected {expected:.2f} on {dim.scale_min}..{dim.scale_max} "
                                   f"(digit mass {mass:.2f})"))
        flu = float(res.span.mean())
        return ItemScore(id=self.item.id, scores=scores, rubric=self.item.rubric.name, backend="local",
                         fluency=round(flu, 6))


class PairwisePlan:
    def __init__(self, conv: Conversation, item: CompareItem, choices: list[list[int]]) -> None:
        if not all(choices):
            raise InvalidRequest("the judge model's tokenizer has no single token for 'A' and 'B': use method "
                                 "likelihood for pairwise judging with this model")
        self.item = item
        prefix = conv.pre + conv.ids(PAIR_BODY.format(prompt=item.prompt, a=item.first, b=item.second))
        conts = [Cont(conv.ids(PAIR_QUESTION.format(title=d.title, description=d.description.rstrip())) + conv.mid,
                      0, choices) for d in item.rubric.dimensions]
        for c in conts:
            c.score_from = len(c.tokens)
        self.queries = [Query(prefix, (0, 0), conts)]

    def longest(self) -> int:
        return longest_sequence(self.queries)

    def finish(self, results: list[Result]) -> PairVerdict:
        dims = []
        for dim, (pa, pb) in zip(self.item.rubric.dimensions, results[0].nexts, strict=True):
            prob = pa / (pa + pb) if pa + pb > 0 else 0.5
            dims.append(DimVerdict(dim.name, round(prob, 6), f"P(A) {pa:.3f}, P(B) {pb:.3f}"))
        overall = sum(d.prob_first for d in dims) / len(dims)
        return PairVerdict(dims, round(overall, 6), "local")
