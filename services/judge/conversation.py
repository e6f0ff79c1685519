"""The judge model's chat template cut into fixed pieces, so every signal can build token ids from parts.

    <pre> prompt <mid> response <post>            the conversation being judged
    <turn> question <answer>                     a follow-up user turn and the start of the assistant's answer

Pieces are tokenised separately and concatenated, so a response has the same ids in every sequence it
appears in (the prefix of a probe, the G-Eval question, the PMI baseline), which is what lets signals
share a forward pass. A tokenizer without a usable chat template gets a plain "Instruction/Response" layout.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tokenmill.judge.conversation")

_P, _R, _Q = "\x00TM_PROMPT\x00", "\x00TM_RESPONSE\x00", "\x00TM_QUESTION\x00"


class Conversation:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.chat = False
        self.singles: dict[str, list[int]] = {}  # text -> its single-token ids (services.judge.geval), once each
        if getattr(tokenizer, "chat_template", None):
            conv = [{"role": "user", "content": _P}, {"role": "assistant", "content": _R}]
            try:
                first = tokenizer.apply_chat_template(conv, tokenize=False)
                full = tokenizer.apply_chat_template([*conv, {"role": "user", "content": _Q}], tokenize=False,
                                                     add_generation_prompt=True)
            except Exception as exc:  # a template that rejects this shape: use the plain one
                log.warning("chat template unusable for judging (%s); using a plain template", exc)
            else:
                if (full.startswith(first) and first.count(_P) == 1 and first.count(_R) == 1
                        and first.index(_P) < first.index(_R) and full[len(first):].count(_Q) == 1):
                    self.chat = True
                    pre, rest = first.split(_P)
                    mid, post = rest.split(_R)
                    turn, answer = full[len(first):].split(_Q)
        if not self.chat:
            pre, mid, post = (tokenizer.bos_token or "") + "Instruction: ", "\n\nResponse: ", ""
            turn, answer = "\n\nQuestion: ", "\nAnswer:"
        self.pre, self.mid, self.post = self.ids(pre), self.ids(mid), self.ids(post)
        self.turn, self.answer = self.ids(turn), self.ids(answer)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def head(self, prompt: str) -> list[int]:
        """Everything before the response: the template, the user's prompt, the assistant's turn opening."""
        return self.pre + self.ids(prompt) + self.mid

    def question(self, text: str) -> list[int]:
        """A follow-up user turn and the opening of the assistant's answer, after `post`."""
        return self.turn + self.ids(text) + self.answer

    @property
    def end_id(self) -> int | None:
        """The token that ends the assistant's turn (its probability after the response = 'the text is done')."""
        return self.post[0] if self.post else self.tok.eos_token_id
