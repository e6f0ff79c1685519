"""Likelihood signals, defined per dimension in the rubric file; what each measures and how it is computed.

    signals:
      - kind: probe                     # contrastive statements after the story
        probes:
          - positive: " The lesson: {moral} is good."       # no question: continues the response itself
            negative: " The lesson: {moral} is bad."
          - question: What is the lesson of your story?     # a follow-up turn, then the answer
            positive: The lesson is that {moral} is good.
            negative: The lesson is that {moral} is bad.

Every signal is oriented so that higher means better, in nats unless said otherwise:

| kind      | value |
|-----------|-------|
| `fluency` | mean log p(response token given the prompt) |
| `pmi`     | that minus the same given `baseline` (a generic prompt): how much the prompt explains the response |
| `order`   | that minus the mean log p of the response's sentences in a shuffled order (0 for one sentence) |
| `end`     | log p that the assistant's turn ends right after the response (low for a cut-off text) |
| `probe`   | mean over probes of log p(positive statement) - log p(negative statement), both after the response |
| `lexicon` | minus the hits per 100 words of terms from a word list that ships in a package (`empath`) |

Statements take `{name}` variables read from the prompt by the rubric's `variables.pattern`.
"""

from __future__ import annotations

import importlib.util
import random
import re
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from services.common.sampling import InvalidRequest

KINDS = ("fluency", "pmi", "order", "end", "probe", "lexicon")
DEFAULT_BASELINE = "Write a short story."
MAX_PROBES = 8
_VAR = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class Probe:
    positive: str
    negative: str
    question: str = ""  # empty: the statement continues the response inside the assistant's turn


@dataclass(frozen=True, slots=True)
class Signal:
    kind: str
    name: str
    baseline: str = DEFAULT_BASELINE  # pmi
    probes: tuple[Probe, ...] = ()  # probe
    package: str = "empath"  # lexicon
    categories: tuple[str, ...] = ()  # lexicon


def signal_from_dict(raw: Any, where: str) -> Signal:
    if not isinstance(raw, dict) or raw.get("kind") not in KINDS:
        raise ValueError(f"{where}: a signal needs kind one of {', '.join(KINDS)}, got {raw!r}")
    kind = raw["kind"]
    name = str(raw.get("name") or kind)
    if kind == "probe":
        probes = raw.get("probes") or []
        if not 1 <= len(probes) <= MAX_PROBES or not all(isinstance(p, dict) and p.get("positive")
                                                          and p.get("negative") for p in probes):
            raise ValueError(f"{where}: probe signal {name!r} needs 1..{MAX_PROBES} probes with positive and negative")
        return Signal(kind, name, probes=tuple(Probe(str(p["positive"]), str(p["negative"]),
                                                     str(p.get("question") or "")) for p in probes))
    if kind == "lexicon":
        cats = tuple(raw.get("categories") or ())
        package = str(raw.get("package") or "empath")
        missing = [c for c in cats if c not in lexicon_categories(package)]
        if not cats or missing:
            raise ValueError(f"{where}: lexicon {name!r} needs categories of {package}'s word list; unknown: {missing}")
        return Signal(kind, name, package=package, categories=cats)
    return Signal(kind, name, baseline=str(raw.get("baseline") or DEFAULT_BASELINE))


@cache
def lexicon_categories(package: str) -> dict[str, frozenset[str]]:
    """The categories of a word list shipped in an installed package (read from its data, never imported)."""
    if package != "empath":
        raise ValueError(f"lexicon package {package!r} is not supported: use empath")
    spec = importlib.util.find_spec("empath")  # importing it would pull `requests` for its web API: not needed
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the lexicon signal needs the empath package: pip install empath==0.89")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "categories.tsv"
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, *terms = line.split("\t")
        out[name] = frozenset(t.lower() for t in terms if t)
    return out


def lexicon_rate(text: str, signal: Signal) -> tuple[float, list[str]]:
    """Hits per 100 words of the signal's categories, and the words that hit."""
    cats = lexicon_categories(signal.package)
    terms = frozenset().union(*(cats[c] for c in signal.categories))
    words = re.findall(r"[a-z][a-z'\-]*", text.lower())
    hits = [w for w in words if w in terms]
    return 100.0 * len(hits) / max(1, len(words)), hits


def fill(template: str, variables: dict[str, str]) -> str:
    """`{moral}` -> the prompt's moral; unknown names stay as written."""
    return _VAR.sub(lambda m: variables.get(m.group(1), m.group(0)), template)


def prompt_variables(prompt: str, pattern: str, defaults: dict[str, str]) -> dict[str, str]:
    found = re.search(pattern, prompt, re.I) if pattern else None
    got = {k: v.strip() for k, v in (found.groupdict() if found else {}).items() if v}
    return {**defaults, **got}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def reorder(parts: list[str], seed: int | str) -> str:
    """The parts joined in a seeded random order that differs from the given one (when there are two or more)."""
    rng = random.Random(seed)
    order = list(range(len(parts)))
    while len(parts) > 1 and order == sorted(order):
        rng.shuffle(order)
    return " ".join(parts[i] for i in order)


def shuffled_sentences(text: str) -> str | None:
    """The sentences in another order, the same for the same text; None for a single sentence."""
    parts = sentences(text)
    return reorder(parts, zlib.crc32(text.encode())) if len(parts) > 1 else None


def check_signals(signals: list[Signal], where: str) -> tuple[Signal, ...]:
    names = [s.name for s in signals]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"{where}: signal names repeat ({names}); give each a distinct name")
    return tuple(signals)
