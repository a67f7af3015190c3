import numpy as np
import pytest

from jaxattn.lm.data import batch_at, evaluation_windows, load_corpus
from jaxattn.lm.tokenizer import decode


def test_default_corpus_split_is_deterministic():
    first, second = load_corpus(), load_corpus()
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.validation, second.validation)
    total = len(first.train) + len(first.validation)
    assert len(first.train) == int(0.9 * total)
    from pydoc_data.topics import topics

    assert decode(first.train[:200]) == topics[sorted(topics)[0]][:200]


def test_corpus_from_file_and_bad_files(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("ab" * 50, encoding="utf-8")
    corpus = load_corpus(path)
    assert decode(np.concatenate([corpus.train, corpus.validation])) == "ab" * 50
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="has 0 bytes"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8 text \(byte 3"):
        load_corpus(tmp_path / "latin1.txt")


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(500, dtype=np.int32)
    a = batch_at(tokens, 7, batch=3, length=5, seed=1)
    np.testing.assert_array_equal(a, batch_at(tokens, 7, batch=3, length=5, seed=1))
    assert not np.array_equal(a, batch_at(tokens, 8, batch=3, length=5, seed=1))
    np.testing.assert_array_equal(a[:, 1:], a[:, :-1] + 1)  # windows of consecutive tokens
    windows = evaluation_windows(np.arange(11), length=5)
    np.testing.assert_array_equal(windows, [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 10]])
