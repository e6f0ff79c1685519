"""Structured output: compile a request's constraint into a grammar, and mask the logits of constrained rows.

xgrammar does the work (`tokenmill bench structured` at batch 1 / 32: 0.24 / 6.2 ms of mask work per step,
llguidance 0.48 / 3.8 ms; the difference at 32 is ~3 % of a step: README). A request's grammar is compiled
off the engine thread when it arrives (the compiler caches repeated schemas); each constrained sequence holds
a matcher that advances with every token it keeps. Each step fills one bitmask row per constrained row and applies
them all in one call before the sampler, so greedy and sampled requests alike can only pick allowed tokens.
Once a grammar is complete the mask allows only the stop tokens, so the request ends with `stop`.

Speculative decoding is off for constrained requests: their drafts would need a mask per drafted position.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import torch

from services.common.sampling import InvalidRequest, Structured
from services.worker.engine.sequence import Sequence

log = logging.getLogger("tokenmill.engine")

JSON_OBJECT = '{"type": "object"}'


class Grammars:
    """Compiler and bitmask for one engine's tokenizer and vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_ids) or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=max(1, os.cpu_count() or 1))
        self.bitmask = xgr.allocate_token_bitmask(64, vocab_size)
        self._lock = threading.Lock()

    def compile(self, spec: Structured) -> Any:
        """The compiled grammar of a constraint; InvalidRequest with the library's reason when it has none."""
        try:
            with self._lock:  # one compile at a time: each one already uses every core
                if spec.kind == "json_schema":
                    return self.compiler.compile_json_schema(spec.value, any_whitespace=False)
                if spec.kind == "json_object":  # any properties: strict mode would allow only {}
                    return self.compiler.compile_json_schema(JSON_OBJECT, any_whitespace=False, strict_mode=False)
                if spec.kind == "regex":
                    return self.compiler.compile_regex(spec.value)
                rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices)
                return self.compiler.compile_grammar(self.xgr.Grammar.from_ebnf(f"root ::= {rule}"))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"{spec.kind} cannot be used for structured output: {exc}") from None

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, Sequence]]) -> None:
        """Set the logits of tokens each constrained row's grammar forbids to -inf, in place."""
        if self.bitmask.shape[0] < logits.shape[0]:
            self.bitmask = self.xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        apply = []
        for row, seq in rows:
            if seq.matcher.fill_next_token_bitmask(self.bitmask, row):
                apply.append(row)
        if apply:
            self.xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device), indices=apply,
                                                 vocab_size=self.vocab_size)

    @staticmethod
    def accept(seq: Sequence, token: int) -> bool:
        """Advance the sequence's matcher; False if the grammar refuses the token (then the request stops)."""
        if seq.matcher.is_terminated():
            return False
        ok = seq.matcher.accept_token(token)
        if not ok:
            log.warning("%s: grammar refused token %d", seq.request_id, token)
        return ok

    @staticmethod
    def finished(seq: Sequence) -> bool:
        return seq.matcher.is_terminated()
