import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn.lm.tokenizer import decode, encode, token_label


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    tokens = encode(text)
    assert tokens.dtype == np.int32 and (len(tokens) == 0 or tokens.max() < 256)
    assert decode(tokens) == text


def test_decode_rejects_non_bytes():
    with pytest.raises(ValueError, match=r"range \[0, 300\]"):
        decode([0, 300])


def test_token_labels_are_printable():
    assert [token_label(t) for t in (32, 65, 10, 200)] == ["␣", "A", "\\n", "\\xc8"]
