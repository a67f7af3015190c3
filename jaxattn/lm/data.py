"""The training text and the batches drawn from it.

Default corpus: the standard library's ``pydoc_data.topics`` (the text behind
``help('TOPIC')``), which every Python install ships. Topics are joined in sorted
order; the first 90% of the bytes train, the last 10% validate. Deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxattn.lm.tokenizer import encode

TRAIN_FRACTION = 0.9


class Corpus(NamedTuple):
    train: np.ndarray  # int32 [N_train] byte tokens
    validation: np.ndarray  # int32 [N_val]
    name: str


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def load_corpus(path=None, *, min_tokens: int = 2) -> Corpus:
    """Reads ``path`` (UTF-8 text) or the default corpus and splits it 90/10."""
    if path is None:
        text, name = default_text(), "pydoc_data.topics"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        try:
            text, name = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as error:
            raise ValueError(
                f"data file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); "
                "convert it first, e.g. `iconv -f LATIN1 -t UTF-8`"
            ) from error
    tokens = encode(text)
    if len(tokens) < 2 * min_tokens:
        raise ValueError(f"data file {name!r} has {len(tokens)} bytes; need at least {2 * min_tokens} to train")
    split = int(len(tokens) * TRAIN_FRACTION)
    return Corpus(tokens[:split], tokens[split:], name)


def batch_at(tokens: np.ndarray, step: int, *, batch: int, length: int, seed: int) -> np.ndarray:
    """Batch ``step`` of random windows: int32 ``[batch, length + 1]`` (inputs + next token).

    A pure function of ``(seed, step)``, so a resumed run sees exactly the batches an
    uninterrupted run would have seen.
    """
    if len(tokens) < length + 1:
        raise ValueError(f"the training text has {len(tokens)} tokens, fewer than one window of {length + 1}")
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - length, size=batch)
    return np.stack([tokens[s : s + length + 1] for s in starts])


def evaluation_windows(tokens: np.ndarray, *, length: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows covering ``tokens``: int32 ``[N, length + 1]``.

    Consecutive windows share one token (the target of one is the first input of the
    next), so every token after the first is predicted exactly once. With
    ``max_windows``, that many windows spread evenly over the text (a cheaper estimate).
    """
    count = (len(tokens) - 1) // length
    if count < 1:
        raise ValueError(f"the validation text has {len(tokens)} tokens, fewer than one window of {length + 1}")
    chosen = range(count)
    if max_windows is not None and max_windows < count:
        chosen = np.linspace(0, count - 1, max_windows).round().astype(int)
    return np.stack([tokens[i * length : i * length + length + 1] for i in chosen])
