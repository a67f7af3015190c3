"""Text as it streams: never half a character, stop strings cut and held back, and the chunks
add up to the whole reply's text with real checkpoints' tokenizers."""

from pathlib import Path

import numpy as np
import pytest

from jaxattn.lm.hf.tokenizer import load_tokenizer
from jaxattn.serve.text import TextStream, held_back

FIXTURES = Path(__file__).parent.parent / "data" / "hf"


def utf8(tokens):  # a byte-level tokenizer: token = byte
    return bytes(tokens).decode("utf-8", errors="replace")


def stream(tokens, stops=(), decode=utf8):
    text = TextStream(decode, stops)
    pieces = [text.add([token]) for token in tokens]
    return pieces, text.finish(), text


def test_half_a_character_is_never_sent():
    pieces, rest, _ = stream("né é".encode())
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + rest == "né é"
    assert pieces[:3] == ["n", "", "é"]  # "é" is two bytes: nothing after the first


def test_stop_strings_are_cut_and_what_could_begin_one_is_held_back():
    pieces, rest, text = stream(b"one\n\nUser: two", stops=["\n\nUser:"])
    assert "".join(pieces) + rest == "one" and text.stopped and rest == ""
    pieces, rest, text = stream(b"one\n\nUs two", stops=["\n\nUser:"])
    assert pieces[3:7] == ["", "", "", ""] and "".join(pieces) + rest == "one\n\nUs two" and not text.stopped
    pieces, _, _ = stream(b"abcXYdefEND", stops=["END", "XY"])
    assert "".join(pieces) == "abc"  # the earliest stop wins
    assert held_back("hello wo", ["world"]) == 2 and held_back("hello", ["world"]) == 0


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma2", "gpt2", "olmo2"])
def test_streamed_chunks_add_up_to_the_whole_text(family):
    tokenizer = load_tokenizer(FIXTURES / family)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for seed in range(3):
        ids = [int(i) for i in np.random.default_rng(seed).integers(0, tokenizer.vocab_size, 80)]
        pieces, rest, _ = stream(ids, decode=decode)
        assert "".join(pieces) + rest == decode(ids)
    text = "Hello, world: une journée éclatante, 1 + 1 = 2."
    pieces, rest, _ = stream(list(tokenizer.encode(text, add_special_tokens=False)), decode=decode)
    assert "".join(pieces) + rest == decode(list(tokenizer.encode(text, add_special_tokens=False)))
