"""The seed's design, kept as the baseline: one `model.generate` call per static batch.

A batch of up to `max_batch_size` waiting requests is left-padded and run to
the longest max_tokens in it; a request that finishes early holds its row until
the batch ends. Sampling settings are the batch's first request's (generate
takes one set); stop strings, stop tokens and max_tokens are applied per
request afterwards. Events come at the end of the batch, all at once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from services.common.sampling import InvalidRequest
from services.worker.engine.detokenizer import IncrementalDetokenizer
from services.worker.engine.models.spec import ModelShape
from services.worker.engine.types import FINISH_LENGTH, FINISH_STOP, Event, Request, Stats


class HFStaticEngine:
    name = "hf-static"
    block_size = 0

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 32, max_model_len: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        own = ModelShape.from_config(model.config).context_length
        self.max_model_len = min(max_model_len, own) if max_model_len else own
        self.eos_ids = set(_as_list(model.generation_config.eos_token_id))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.waiting: deque[Request] = deque()
        self.running = 0
        self.running_tokens = 0

    def add_request(self, request: Request) -> None:
        p = request.params
        asked = [name for name, on in (("logprobs", p.logprobs or p.prompt_logprobs),
                                       ("structured output", p.structured is not None),
                                       ("penalties, logit_bias, min_p, min_tokens and bad_words",
                                        p.penalised or p.min_p > 0),
                                       ("n / best_of > 1", p.best_of > 1)) if on]
        if asked:
            raise InvalidRequest(f"{' and '.join(asked)} need the paged engine; this worker runs --engine hf-static")
        request.params.check_fits(len(request.prompt_token_ids), self.max_model_len)
        if max(request.prompt_token_ids) >= self.model.config.vocab_size:
            raise InvalidRequest("prompt has token ids outside the model's vocabulary")
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return True
        return False  # a running generate() cannot be interrupted: that is the design's weakness

    def has_work(self) -> bool:
        return bool(self.waiting)

    def stats(self) -> Stats:
        return Stats(
            running=self.running,
            waiting=len(self.waiting),
            capacity=self.max_batch_size,
            outstanding_tokens=sum(r.params.max_tokens for r in self.waiting) + self.running_tokens,
        )

    def step(self) -> list[Event]:
        ordered = sorted(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        batch = ordered[: self.max_batch_size]
        for req in batch:
            self.waiting.remove(req)
        self.running, self.running_tokens = len(batch), sum(r.params.max_tokens for r in batch)
        try:
            sequences = self._generate(batch)
        finally:
            self.running = self.running_tokens = 0
        return [self._finish(req, out, len(batch)) for req, out in zip(batch, sequences, strict=True)]

    @torch.inference_mode()
    def _generate(self, batch: list[Request]) -> list[list[int]]:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, req in enumerate(batch):
            n = len(req.prompt_token_ids)
            ids[row, width - n :] = torch.tensor(req.prompt_token_ids)
            mask[row, width - n :] = 1
        lead = batch[0].params
        kwargs: dict[str, Any] = {"do_sample": not lead.greedy}
        if not lead.greedy:
            kwargs.update(temperature=lead.temperature, top_p=lead.top_p, top_k=lead.top_k or None)
            if lead.seed is not None:
                torch.manual_seed(lead.seed)
        if all(r.params.ignore_eos for r in batch):
            kwargs["eos_token_id"] = None
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max(r.params.max_tokens for r in batch),
            pad_token_id=self.pad_id,
            **kwargs,
        )
        return out[:, width:].tolist()

    def _finish(self, req: Request, generated: list[int], batch_size: int) -> Event:
        p = req.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.stop)
        tokens: list[int] = []
        text, reason = "", FINISH_LENGTH
        for tok in generated[: p.max_tokens]:
            tokens.append(tok)
            if tok in stops:
                reason = FINISH_STOP
                break
            text += detok.add([tok])
            if detok.stopped:
                reason = FINISH_STOP
                break
        text += detok.flush()
        return Event(req.request_id, tokens, text, finish_reason=reason, prompt_tokens=len(req.prompt_token_ids),
                     completion_tokens=len(tokens), batch_size=batch_size)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [int(value)]
