"""Workloads of `tokenmill bench routing`: multi-turn chats whose histories grow, single-turn questions under a
few long system prompts shared by many users, and distinct single-turn prompts (uniform). Everything is drawn
from a seed, so both routing modes get the same work."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from services.judge.stories import sample_prompts

PERSONAS = (
    "You are Bramble, the storyteller of a public library's children's corner.",
    "You are Professor Quill, who writes reading exercises for a primary school.",
    "You are Luma, a bedtime-story companion app for families.",
)
RULES = (
    "Write for children aged five to nine, in short sentences and everyday words.",
    "Every story has a named animal hero, a setting a child can picture, and one clear moral.",
    "Keep the tone gentle: no violence, no frightening villains, no sad endings.",
    "Show the moral through what the hero does rather than by stating it at the start.",
    "When asked to change a story, keep its hero, setting and moral unless told otherwise.",
    "Answer follow-up questions about a story in two or three sentences.",
    "If a request is not about stories, steer back kindly to storytelling.",
    "Use British spelling, and never use more than one exclamation mark in a story.",
    "Prefer concrete details a child knows, like muddy boots, warm bread or a squeaky gate.",
    "End every story with a sentence that shows what the hero learned.",
)
FOLLOW_UPS = (
    "Make it shorter.", "Give the hero a name and tell it again.", "What happens next?", "Add a funny sidekick.",
    "Explain the moral in one sentence.", "Rewrite it for a five-year-old.", "Give it a title.",
    "Tell the same story from the friend's point of view.", "Add a twist at the end.",
)


def system_prompts(n: int) -> list[str]:
    """n long system prompts (~200 tokens each) shared by many users: a persona and the house rules in a
    persona-specific order."""
    return [" ".join([PERSONAS[i % len(PERSONAS)], *(RULES[(i + j) % len(RULES)] for j in range(len(RULES)))])
            for i in range(n)]


@dataclass(slots=True)
class Conversation:
    user_turns: list[str]
    messages: list[tuple[str, str]] = field(default_factory=list)  # (role, content) so far

    @property
    def done(self) -> bool:
        return sum(1 for role, _ in self.messages if role == "user") >= len(self.user_turns)

    def next_messages(self) -> list[tuple[str, str]]:
        """The history plus this conversation's next user turn (appended to it)."""
        turn = sum(1 for role, _ in self.messages if role == "user")
        self.messages.append(("user", self.user_turns[turn]))
        return list(self.messages)

    def reply(self, text: str) -> None:
        self.messages.append(("assistant", text))


def conversations(n: int, min_turns: int, max_turns: int, seed: int) -> list[Conversation]:
    """n chats of min..max_turns user turns: a story request, then follow-ups on it."""
    rng = random.Random(seed)
    stories = sample_prompts(n, seed)
    return [Conversation([stories[i], *rng.sample(FOLLOW_UPS, rng.randint(min_turns, max_turns) - 1)])
            for i in range(n)]


def shared_system(n: int, n_system: int, seed: int) -> list[list[tuple[str, str]]]:
    """n single-turn chats, each under one of n_system long system prompts (in a shuffled order)."""
    rng = random.Random(seed + 2)
    systems = system_prompts(n_system)
    return [[("system", systems[rng.randrange(n_system)]), ("user", q)] for q in sample_prompts(n, seed + 3)]


def uniform_prompts(n: int, seed: int) -> list[str]:
    """Distinct single-turn prompts that share nothing beyond the chat template (a balance check)."""
    return sample_prompts(n, seed + 1)
