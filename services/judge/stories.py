"""The children's story prompt set: 20 characters x 15 morals x 5 settings = 1,500 prompts.

The judge's labelled set is written for it; the load test, the benchmarks and the tests send it."""

from __future__ import annotations

import itertools
import random

TEMPLATE = ("Write a single paragraph moral story for children about a {character} who learns the value of "
            "{moral} in a {setting}.")

CHARACTERS = (
    "curious fox", "shy turtle", "brave little mouse", "clumsy elephant", "proud peacock", "lazy cat",
    "greedy squirrel", "lonely owl", "noisy parrot", "grumpy bear", "tiny ant", "playful dolphin",
    "stubborn goat", "jealous rabbit", "forgetful dragon", "boastful lion", "timid deer", "impatient frog",
    "helpful robot", "wise old tortoise",
)
MORALS = (
    "honesty", "kindness", "patience", "sharing", "courage", "friendship", "hard work", "gratitude",
    "forgiveness", "humility", "teamwork", "perseverance", "respect", "generosity", "responsibility",
)
SETTINGS = ("enchanted forest", "busy city", "quiet village by the sea", "snowy mountain", "sunny farm")


def all_prompts() -> list[str]:
    return [TEMPLATE.format(character=c, moral=m, setting=s)
            for c, m, s in itertools.product(CHARACTERS, MORALS, SETTINGS)]


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts drawn with a fixed seed: without replacement while n <= 1500, then cycling."""
    prompts = all_prompts()
    rng = random.Random(seed)
    order = rng.sample(prompts, len(prompts))
    return [order[i % len(order)] for i in range(n)]


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]
