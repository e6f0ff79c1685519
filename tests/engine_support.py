"""Helpers for the engine tests: reference greedy runs, driving an engine, the near-tie parity rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.common.sampling import SamplingParams
from services.worker.engine.types import Event, Request

TIE_GAP = 1e-3  # fp32: a divergence counts as parity only where the reference's top two logits are this close


class WordTokenizer:
    """Just enough tokenizer for the detokenizer of a tiny random model: ids as words."""

    eos_token_id = None

    def decode(self, ids, **_):
        return "".join(f" w{i}" for i in ids)


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """These tests run small batches: one torch thread is as fast as two, and far faster when another
    process holds a core (two OpenMP threads then wait on each other). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Reference:
    tokens: list[int]
    top2_gaps: list[float]  # per generated step: reference logit gap between its best and second-best token
    top: list[dict[int, float]]  # per generated step: token id -> logprob of the top-5


def top_logprobs(logits: torch.Tensor, k: int = 5) -> dict[int, float]:
    lp = torch.log_softmax(logits.float(), dim=-1).topk(k)
    return dict(zip(lp.indices.tolist(), lp.values.tolist(), strict=True))


@torch.inference_mode()
def reference_greedy(model, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[Reference]:
    """model.generate(do_sample=False) for each prompt alone; keeps each step's top-2 logit gap and top-5
    logprobs."""
    refs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
        tokens = out.sequences[0, len(prompt):].tolist()
        gaps = []
        for step_logits in out.logits:
            top = step_logits[0].float().topk(2).values
            gaps.append(float(top[0] - top[1]))
        refs.append(Reference(tokens[: len(gaps)], gaps, [top_logprobs(step[0]) for step in out.logits]))
    return refs


def parity_prompts(tok) -> list[list[int]]:
    """22 prompts of 1..~230 tokens: raw text, chat-templated stories, long ones, two sharing a prefix."""
    from services.judge.stories import sample_prompts

    stories = sample_prompts(40, seed=3)
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False) for p in stories[:8]]
    raw = [tok.encode(t) for t in ("Hello", "The capital of France is", "Once upon a time,",
                                   "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,")]
    long = [tok.encode(" ".join(stories[8 + i : 8 + i + k])) for i, k in ((0, 2), (2, 3), (5, 5), (10, 7), (17, 9))]
    shared = tok.encode(" ".join(stories[30:33]))  # two prompts sharing a 3-sentence prefix of full blocks
    out = [[raw[0][0]], *raw, *chats, *long, shared + tok.encode(" And then?"), shared + tok.encode(" Why?")]
    assert len(out) >= 20 and len({len(p) for p in out}) >= 15
    return out


def params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def drive(engine, arrivals: dict[int, list[Request]], max_steps: int = 100_000,
          on_step: Callable[[int, list[Event]], None] | None = None) -> dict[str, list[Event]]:
    """Step the engine until idle, adding arrivals[k] before step k; returns each request's events."""
    events: dict[str, list[Event]] = {}
    step = 0
    while step < max_steps:
        for req in arrivals.get(step, []):
            engine.add_request(req)
            events.setdefault(req.request_id, [])
        if not engine.has_work() and step > max(arrivals, default=0):
            break
        out = engine.step()
        for ev in out:
            events.setdefault(ev.request_id, []).append(ev)
        if on_step is not None:
            on_step(step, out)
        step += 1
    assert not engine.has_work(), "engine did not drain"
    return events


def tokens_of(events: list[Event]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def check_parity(name: str, got: dict[str, list[int]], refs: dict[str, Reference], tie_gap: float = TIE_GAP) -> int:
    """Assert token-for-token equality except at near ties; returns the number of near-tie divergences."""
    ties = 0
    for rid, ref in refs.items():
        out = got[rid]
        if out == ref.tokens:
            continue
        k = next((i for i, (a, b) in enumerate(zip(out, ref.tokens, strict=False)) if a != b), None)
        assert k is not None, f"{name}/{rid}: lengths differ without a differing token: {out} vs {ref.tokens}"
        assert ref.top2_gaps[k] <= tie_gap, (
            f"{name}/{rid}: diverged at step {k} ({out[k]} vs reference {ref.tokens[k]}) where the reference's "
            f"top-2 logit gap is {ref.top2_gaps[k]:.4g} (> {tie_gap}): not a near tie\n got {out}\n ref {ref.tokens}")
        ties += 1
    return ties


def assert_no_leaks(engine) -> None:
    s = engine.stats()
    assert s.running == 0 and s.waiting == 0
    assert s.free_kv_blocks == s.total_kv_blocks, f"leaked {s.total_kv_blocks - s.free_kv_blocks} KV blocks"
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def native(model, fmt: str = "none"):
    """The engine's own forward (DecoderModel) over an in-memory transformers model's weights."""
    from services.worker.engine.models.builders import native_from_hf

    return native_from_hf(model, fmt)


def record_logprobs(engine, k: int = 5) -> dict[str, list[dict[int, float]]]:
    """Record, per request, the top-k logprobs of the logits row it samples from at each step (no speculation)."""
    seen: dict[str, list[dict[int, float]]] = {}
    run = engine.runner.run

    def recording(batch):
        samplers, logits = run(batch)
        if logits is not None:
            for row, seq in zip(logits, samplers, strict=True):
                seen.setdefault(seq.request_id, []).append(top_logprobs(row, k))
        return samplers, logits

    engine.runner.run = recording
    return seen


def check_logprobs_close(name: str, got: dict[str, list[int]], got_top: dict[str, list[dict[int, float]]],
                         refs: dict[str, Reference]) -> int:
    """vLLM's rule for quantized models: tokens equal up to the first divergence, and there each side's token
    is among the other's top-k logprobs. Returns how many prompts are identical throughout."""
    identical = 0
    for rid, ref in refs.items():
        out, top = got[rid], got_top[rid]
        k = next((i for i, (a, b) in enumerate(zip(out, ref.tokens, strict=False)) if a != b), None)
        if k is None:
            assert len(out) == len(ref.tokens), f"{name}/{rid}: lengths differ: {out} vs {ref.tokens}"
            identical += 1
            continue
        assert out[k] in ref.top[k] and ref.tokens[k] in top[k], (
            f"{name}/{rid}: step {k}: engine chose {out[k]} (its top-5 {top[k]}), reference {ref.tokens[k]} "
            f"(its top-5 {ref.top[k]})")
    return identical


def reference_attention(q, k_cache, v_cache, table, positions, num_heads, window, scale):
    """Query row i (position positions[i]) over its sequence's keys 0..pos (the window's last keys), in float64
    from the cache tensors ([blocks, kv_heads, block_size, D])."""
    _, kv_heads, bs, d = k_cache.shape
    group = num_heads // kv_heads
    out = []
    for i, pos in enumerate(positions):
        keys = torch.arange(pos + 1)
        if window:
            keys = keys[keys > pos - window]
        blocks = torch.tensor(table)[keys // bs]
        k = k_cache[blocks, :, keys % bs].double().repeat_interleave(group, dim=1)  # [n, heads, D]
        v = v_cache[blocks, :, keys % bs].double().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].view(num_heads, d).double(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v).reshape(-1))
    return torch.stack(out)


def thp_eligible(ptr: int) -> bool:
    """Whether the mapping holding address `ptr` may get transparent huge pages (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return False
