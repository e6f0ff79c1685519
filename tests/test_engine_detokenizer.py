"""IncrementalDetokenizer with the embedded model's byte-level BPE tokenizer."""

from __future__ import annotations

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


def stream(tok, prompt_ids, ids, stop=()):
    detok = IncrementalDetokenizer(tok, prompt_ids, tuple(stop))
    deltas = []
    for t in ids:
        deltas.append(detok.add([t]))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode_and_never_split_characters(tok, text):
    prompt = tok.encode("Say something:")
    ids = tok.encode(text)
    assert len(ids) > 5
    _, deltas = stream(tok, prompt, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_span_several_tokens(tok):
    ids = tok.encode("🦊")
    assert len(ids) > 1, "the test needs a character split over several byte tokens"
    _, deltas = stream(tok, [], ids)
    assert deltas[: len(ids) - 1] == [""] * (len(ids) - 1) and "".join(deltas) == "🦊"


def test_unfinished_character_at_the_end_is_flushed_like_a_full_decode(tok):
    ids = tok.encode("ok 🦊")[:-1]  # cut inside the emoji's bytes
    _, deltas = stream(tok, [], ids)
    assert "".join(deltas) == tok.decode(ids)
    assert "\ufffd" not in "".join(deltas[:-1])


def test_special_tokens_are_skipped(tok):
    ids = [*tok.encode("Hi there"), tok.eos_token_id]
    _, deltas = stream(tok, [], ids)
    assert "".join(deltas) == "Hi there"


@pytest.mark.parametrize(("stop", "expected"), [
    (("STOP",), "The fox ran. "),
    (("ran", "STOP"), "The fox "),  # the earliest stop string wins
    (("x r",), "The fo"),  # spans a token boundary
    (("never there",), "The fox ran. STOP and more words after it."),
])
def test_stop_strings_are_cut(tok, stop, expected):
    ids = tok.encode("The fox ran. STOP and more words after it.")
    detok, deltas = stream(tok, tok.encode("prompt STOP ran"), ids, stop)  # stops in the prompt do not count
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
