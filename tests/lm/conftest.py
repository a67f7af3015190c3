"""Fixtures of the lm tests: a small corpus (the tiny model and recipe are in tests/tiny.py)."""

import pytest

from jaxattn.lm.data import Corpus
from jaxattn.lm.tokenizer import encode
from tests.tiny import TEXT


@pytest.fixture
def corpus():
    tokens = encode(TEXT)
    return Corpus(tokens[:1600], tokens[1600:], "fox")
