"""The prompts the serving benchmarks send, as Work: the story prompt set (chat template; max_tokens drawn per
request with a fixed seed), held-out paragraphs to repeat (where speculation shines), and long excerpts of the
docstrings of Python's own standard library with a question (text every machine builds alike from its
interpreter)."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace
from typing import Any

# The long workload's text: docstrings of these standard-library modules, their public classes, functions and methods.
CORPUS_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "configparser", "contextlib", "csv",
                  "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "fractions",
                  "functools", "gettext", "heapq", "http.client", "imaplib", "inspect", "ipaddress", "itertools",
                  "json", "logging", "mailbox", "optparse", "pathlib", "pickle", "random", "re", "shutil", "smtplib",
                  "socket", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
                  "unittest", "urllib.parse", "uuid", "zipfile")
QUESTIONS = ("Summarise the text above in three sentences.", "What are the main points of the text above?",
             "Explain the text above to a new Python programmer.", "Which functions or classes does the text above "
             "describe, and what does each do?", "Write a short example that uses what the text above describes.",
             "What could go wrong when using what the text above describes?")



@dataclass
class Work:
    name: str
    prompts: list[str]
    prompt_ids: list[list[int]]
    max_tokens: list[int]
    ignore_eos: bool
    fresh: bool = False  # each concurrency level its own prompts (long: no prefix-cache hit across levels)
    source: str = ""

    def level(self, k: int, n: int) -> tuple[Work, Work]:
        """The k-th concurrency level's n timed requests and its warm-up request (a prompt of its own)."""
        start = k * (n + 1) if self.fresh else 0

        def part(a: int, b: int) -> Work:
            return replace(self, prompts=self.prompts[a:b], prompt_ids=self.prompt_ids[a:b],
                           max_tokens=self.max_tokens[a:b])

        return part(start, start + n), part(start + n, start + n + 1)


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of `prompt` as one user message under the model's chat template."""
    from services.judge.stories import chat_messages

    return tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


REPEAT_ASKS = ("Rewrite this paragraph, keeping its words:", "Copy this paragraph exactly:",
               "Repeat this paragraph with one word changed:")


def repeat_prompts(n: int) -> list[str]:
    from bench.phases.common import heldout_text

    paragraphs = [p.strip() for p in heldout_text().split("\n\n") if p.strip()]
    return [f"{REPEAT_ASKS[(i // len(paragraphs)) % len(REPEAT_ASKS)]}\n\n{paragraphs[i % len(paragraphs)]}"
            for i in range(n)]


def drawn_work(tokenizer: Any, workload: str, requests: int, seed: int, min_tokens: int, max_tokens: int) -> Work:
    """`requests` prompts of the story set (`story`) or paragraphs to repeat (`repeat`), each with max_tokens drawn
    from min_tokens..max_tokens with `seed`."""
    from services.judge.stories import sample_prompts

    if workload not in ("story", "repeat"):
        raise ValueError(f"workload {workload!r}: use story or repeat")
    prompts = sample_prompts(requests, seed) if workload == "story" else repeat_prompts(requests)
    rng = random.Random(seed)
    return Work(workload, prompts, [chat_ids(tokenizer, p) for p in prompts],
                [rng.randint(min_tokens, max_tokens) for _ in prompts], ignore_eos=False)


def corpus() -> tuple[str, str]:
    """The long workload's text (the docstrings of CORPUS_MODULES, in a fixed order) and where it came from."""
    import importlib
    import inspect

    parts, seen = [], set()

    def add(title: str, obj: Any) -> None:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and len(doc) > 80 and id(obj) not in seen:
            seen.add(id(obj))
            parts.append(f"{title}\n\n{inspect.cleandoc(doc)}")

    for name in CORPUS_MODULES:
        mod = importlib.import_module(name)
        add(f"Module {name}", mod)
        for attr in sorted(set(getattr(mod, "__all__", None) or [a for a in vars(mod) if not a.startswith("_")])):
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                add(f"{name}.{attr}", obj)
            if inspect.isclass(obj):
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and inspect.isroutine(fn):
                        add(f"{name}.{attr}.{meth}", fn)
    return "\n\n".join(parts), (f"docstrings of {len(CORPUS_MODULES)} standard-library modules of Python "
                                 f"{sys.version.split()[0]} ({', '.join(CORPUS_MODULES)})")


def long_prompts(tokenizer: Any, count: int, target_tokens: int) -> tuple[list[str], list[list[int]], str]:
    """`count` prompts of about `target_tokens` (chat template included): an excerpt of the corpus starting at its
    own line, then a question. Excerpts are spread evenly over the corpus (overlapping once it is too short)."""

    def prompt(excerpt: str, i: int) -> str:
        return f"Here is part of the Python documentation.\n\n{excerpt}\n\n{QUESTIONS[i % len(QUESTIONS)]}"

    text, source = corpus()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    length = max(16, target_tokens - len(chat_ids(tokenizer, prompt("", 0))))
    stride = max(1, min(length, (len(ids) - length) // max(1, count)))
    prompts = []
    for i in range(count):
        excerpt = tokenizer.decode(ids[i * stride % max(1, len(ids) - length):][:length])
        head, newline, rest = excerpt.partition("\n")  # start at a line, not inside a word
        prompts.append(prompt(rest if newline and len(head) < 200 else excerpt, i).strip())
    return prompts, [chat_ids(tokenizer, p) for p in prompts], source


