"""IncrementalDetokenizer with the embedded model's byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest

from services.worker.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is plain ASCII text with punctuation!",
    "Café crème, naïve façade — “quotes” … and ½ ¾.",
    "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
    "Emoji: 🎉🦊🐢👩‍👩‍👧‍👦 done. Math: ∑ ∫ √ ≠ ≤ ≥.",
    "  leading spaces\nnew lines\n\ttabs  and   runs of spaces  ",
]


@pytest.fixture(scope="module")
def tok():
    from services.common.model_loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(params=["rust-stream", "window-decode"])
def path(request):
    """Each test runs on both paths: the tokenizer's DecodeStream and the two-decode fallback."""
    return request.param


def stream(tok, prompt_ids, ids, stop=(), path="rust-stream"):
    detok = IncrementalDetokenizer(tok, prompt_ids, tuple(stop))
    assert detok.stream is not None, "the embedded model's fast tokenizer should decode through its DecodeStream"
    if path == "window-decode":
        detok.stream = None
    deltas = []
    for t in ids:
        deltas.append(detok.add([t]))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode_and_never_split_characters(tok, text, path):
    prompt = tok.encode("Say something:")
    ids = tok.encode(text)
    assert len(ids) > 5
    _, deltas = stream(tok, prompt, ids, path=path)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_span_several_tokens(tok, path):
    ids = tok.encode("🦊")
    assert len(ids) > 1, "the test needs a character split over several byte tokens"
    _, deltas = stream(tok, [], ids, path=path)
    assert deltas[: len(ids) - 1] == [""] * (len(ids) - 1) and "".join(deltas) == "🦊"


def test_unfinished_character_at_the_end_is_flushed_like_a_full_decode(tok, path):
    ids = tok.encode("ok 🦊")[:-1]  # cut inside the emoji's bytes
    _, deltas = stream(tok, [], ids, path=path)
    assert "".join(deltas) == tok.decode(ids)
    assert "\ufffd" not in "".join(deltas[:-1])


def test_special_tokens_are_skipped(tok, path):
    ids = [*tok.encode("Hi there"), tok.eos_token_id]
    _, deltas = stream(tok, [], ids, path=path)
    assert "".join(deltas) == "Hi there"


@pytest.mark.parametrize(("stop", "expected"), [
    (("STOP",), "The fox ran. "),
    (("ran", "STOP"), "The fox "),  # the earliest stop string wins
    (("x r",), "The fo"),  # spans a token boundary
    (("never there",), "The fox ran. STOP and more words after it."),
])
def test_stop_strings_are_cut(tok, stop, expected, path):
    ids = tok.encode("The fox ran. STOP and more words after it.")
    # stops in the prompt do not count
    detok, deltas = stream(tok, tok.encode("prompt STOP ran"), ids, stop, path=path)
    assert "".join(deltas) == expected
    assert detok.stopped == (expected != tok.decode(ids))


def test_holdback_never_emits_a_partial_stop_string(tok):
    ids = tok.encode("abc END def")
    detok = IncrementalDetokenizer(tok, [], ("END",))
    seen = ""
    for t in ids:
        seen += detok.add([t])
        assert "E" not in seen or detok.stopped
    seen += detok.flush()
    assert seen == "abc "


def test_an_id_the_tokenizer_lacks_decodes_to_nothing(tok, path):
    """A model's vocabulary can be padded past its tokenizer's (Qwen: 151,936 rows, 151,665 tokens): a sampled
    padding id adds no text and the text around it reads as a full decode reads it."""
    ids = [*tok.encode("Hello"), len(tok) + 7, *tok.encode(" world 🦊")]
    _, deltas = stream(tok, [], ids, path=path)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_stream_and_window_decodes_agree_on_random_byte_heavy_ids(tok):
    """Random ids, many of them single bytes (characters split over tokens, prompts that end inside one, stray
    continuation bytes), with and without stop strings: both paths give the same text."""
    rng = random.Random(1)
    pool = list(range(600)) + [rng.randrange(len(tok)) for _ in range(300)]
    streamed = 0
    for _ in range(150):
        prompt = [rng.choice(pool) for _ in range(rng.randrange(8))]
        ids = [rng.choice(pool) for _ in range(40)]
        stop = rng.choice([(), ("e",), ("ab", "\n")])
        texts = []
        for path in ("rust-stream", "window-decode"):
            detok = IncrementalDetokenizer(tok, prompt, stop)
            streamed += path == "rust-stream" and detok.stream is not None
            if path == "window-decode":
                detok.stream = None
            texts.append("".join(detok.add([t]) for t in ids) + detok.flush())
        assert texts[0] == texts[1], (prompt, ids, stop)
    assert streamed > 75  # most prompts decode cleanly and take the stream
