"""Logprobs end to end against the fp32 model's own logits: gRPC, HTTP (the official openai client),
and lm-evaluation-harness's `local-completions` scoring a local task through the HTTP front.

The worker serves fp32 weights (`--quantization none`) so the reference is exact up to float rounding, and
takes 48 tokens a step so the prompts below are prefilled in chunks (each chunk's rows are kept).
"""

from __future__ import annotations

import json

import grpc
import openai
import pytest
import torch
from conftest import free_port
from engine_support import reference_greedy

from services.common.pb import inference_pb2, inference_pb2_grpc

TEXT = ("Once upon a time a little owl lived in an old oak tree at the edge of a quiet forest. Every night she "
        "watched the stars and wondered how far away they were. One evening a fox came by and asked her why "
        "she never slept when the moon was out, and the owl laughed.")
TOL = 1e-4


@pytest.fixture(scope="module")
def fleet(cluster):
    worker = cluster.start("worker", "--engine", "paged", "--quantization", "none", "--max-num-batched-tokens", "48")
    http_port = free_port()
    gw = cluster.gateway([worker], "--http-port", str(http_port))
    return {"grpc": gw.address, "http": f"http://127.0.0.1:{http_port}"}


@pytest.fixture(scope="module")
def reference(loaded):
    """log_softmax of the fp32 transformers model's logits at every position of a token sequence."""

    @torch.inference_mode()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def check(entry, token: int, ref_row: torch.Tensor, k: int) -> None:
    assert entry.token_id == token
    assert abs(entry.logprob - float(ref_row[token])) < TOL, (entry.logprob, float(ref_row[token]))
    got = sorted((t.logprob for t in entry.top), reverse=True)
    assert len(got) == k and all(abs(a - b) < TOL for a, b in zip(got, ref_row.topk(k).values.tolist(), strict=True))
    for t in entry.top:
        assert abs(t.logprob - float(ref_row[t.token_id])) < TOL


def test_grpc_logprobs_of_prompt_and_output_equal_the_fp32_model(fleet, reference):
    with grpc.insecure_channel(fleet["grpc"]) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for temperature in (0.0, 0.8):  # greedy, then sampled: both report the raw model's logprobs
            sampling = inference_pb2.SamplingParams(max_tokens=6, temperature=temperature, seed=7, logprobs=True,
                                                    top_logprobs=5, prompt_logprobs=True, ignore_eos=True)
            r = stub.Generate(inference_pb2.GenerateRequest(prompt=TEXT, sampling=sampling), timeout=120)
            prompt = list(r.prompt_token_ids)
            assert len(prompt) > 48 and len(r.prompt_logprobs) == len(prompt) - 1 and len(r.logprobs) == 6
            ref = reference(prompt + list(r.token_ids))
            for i, entry in enumerate(r.prompt_logprobs):
                check(entry, prompt[i + 1], ref[i], 5)
            for j, entry in enumerate(r.logprobs):
                check(entry, r.token_ids[j], ref[len(prompt) - 1 + j], 5)
                assert entry.token and all(t.token for t in entry.top)
            if temperature == 0.0:
                assert all(e.top[0].token_id == e.token_id for e in r.logprobs)
                streamed = [lp for chunk in stub.GenerateStream(inference_pb2.GenerateRequest(
                    prompt=TEXT, sampling=sampling), timeout=120) for lp in chunk.logprobs]
                assert [(e.token_id, e.logprob) for e in streamed] == [(e.token_id, e.logprob) for e in r.logprobs]


def test_http_logprobs_read_by_the_openai_client(fleet, loaded, reference):
    client = openai.OpenAI(base_url=fleet["http"] + "/v1", api_key="unused")
    prompt = loaded.tokenizer.encode(TEXT, add_special_tokens=False)
    out = reference_greedy(loaded.model, [prompt], 3)[0].tokens
    ref = reference(prompt + out)
    c = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                  logprobs=3)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + 3
    assert c.choices[0].text.startswith(loaded.tokenizer.decode(prompt))
    for pos, value in enumerate(lp.token_logprobs[1:], start=1):
        token = (prompt + out)[pos]
        assert abs(value - float(ref[pos - 1, token])) < TOL
        assert abs(max(lp.top_logprobs[pos].values()) - float(ref[pos - 1].max())) < TOL

    messages = [{"role": "user", "content": "Name a colour."}]
    ids = list(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
    out = reference_greedy(loaded.model, [ids], 4)[0].tokens
    ref = reference(ids + out)
    chat = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [e.token for e in content] == [loaded.tokenizer.decode([t]) for t in out]
    for j, e in enumerate(content):
        assert abs(e.logprob - float(ref[len(ids) - 1 + j, out[j]])) < TOL and len(e.top_logprobs) == 3
        assert e.bytes == list(e.token.encode())


LL_DOCS = [{"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "answer": 0},
           {"question": "Fish live in the", "choices": ["water", "desert"], "answer": 0},
           {"question": "Two plus two equals", "choices": ["four", "seven"], "answer": 0}]
GEN_DOCS = [{"question": "Q: What do bees make?\nA:", "answer": "honey"},
            {"question": "Q: What colour is snow?\nA:", "answer": "white"}]


def _task_files(folder, name: str, docs: list[dict], spec: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"doc_to_text: \"{{{{question}}}}\"\ndoc_to_target: \"{{{{answer}}}}\"\n{spec}")


def test_lm_eval_local_completions_matches_the_model(fleet, loaded, reference, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from services.common.model_loader import resolve

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _task_files(tmp_path, "tokenmill_ll", LL_DOCS, "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
                "metric_list:\n  - metric: acc\n")
    _task_files(tmp_path, "tokenmill_gen", GEN_DOCS, "output_type: generate_until\ngeneration_kwargs:\n"
                "  until: [\"\\n\"]\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n")
    args = (f"model=smollm2-135m,base_url={fleet['http']}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={resolve('smollm2-135m')},max_retries=1")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                      tasks=["tokenmill_ll", "tokenmill_gen"],
                                      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    tok = loaded.tokenizer
    compared = 0
    for sample in results["samples"]["tokenmill_ll"]:
        args = sample["arguments"]  # (context, continuation) per choice; newer lm-eval keeps them in dicts
        pairs = [tuple(a.values()) for a in args.values()] if isinstance(args, dict) else args
        assert len(pairs) == len(sample["doc"]["choices"])
        for (context, cont), resp in zip(pairs, sample["resps"], strict=True):
            ll = resp[0][0]
            ctx_ids = tok.encode(context, add_special_tokens=False)
            whole = tok.encode(context + cont, add_special_tokens=False)
            ref = reference(whole)
            own = sum(float(ref[p - 1, whole[p]]) for p in range(len(ctx_ids), len(whole)))
            assert abs(ll - own) < 1e-3, (context, cont, ll, own)
            compared += 1
    assert compared == 7
    generations = [s["resps"][0][0] for s in results["samples"]["tokenmill_gen"]]
    assert len(generations) == 2 and all(isinstance(g, str) and "\n" not in g for g in generations)
