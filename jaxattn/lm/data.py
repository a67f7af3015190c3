"""The training text and the batches drawn from it.

Default corpus: the standard library's ``pydoc_data.topics`` (the text behind
``help('TOPIC')``), which every Python install ships. Topics are joined in sorted
order; the first 90% of the bytes train, the last 10% validate. Deterministic.

``repeated_tokens``: a stream of random printable bytes, each stretch written more than once.
Nothing in it can be predicted except a repeat, so the only way to lower the loss is to look
back for the token's earlier occurrence and copy what followed it: an induction head (Olsson et
al. 2022, arXiv 2209.11895).
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


REPEATED_TOKENS = "repeated random tokens"
PRINTABLE = np.arange(33, 127)  # the bytes the induction test draws (inspection.induction_candidates)


def repeated_stream(count: int, *, lengths: tuple[int, int], seed: int, copies: int = 2) -> np.ndarray:
    """int32 ``[count]``: stretches of n random printable bytes (n drawn from ``lengths``,
    inclusive), each written ``copies`` times: ``a b c a b c x y x y ...``."""
    rng = np.random.default_rng(seed)
    stretches, total = [], 0
    while total < count:
        stretch = rng.choice(PRINTABLE, int(rng.integers(lengths[0], lengths[1] + 1)))
        stretches += [stretch] * copies
        total += copies * len(stretch)
    return np.concatenate(stretches)[:count].astype(np.int32)


def repeated_tokens(*, train_tokens: int = 1 << 20, lengths: tuple[int, int] = (8, 30), seed: int = 0,
                    copies: int = 2) -> Corpus:
    """The induction preset's corpus (``REPEATED_TOKENS``): ``train_tokens`` bytes of
    ``repeated_stream`` to train on and a ninth as many, from another seed, to validate. The
    repeat lengths cover the induction test's at the preset's context (30 tokens). Nothing in it
    can be predicted except a repeat."""
    return Corpus(repeated_stream(train_tokens, lengths=lengths, seed=seed, copies=copies),
                  repeated_stream(train_tokens // 9, lengths=lengths, seed=seed + 1, copies=copies), REPEATED_TOKENS)


def open_corpus(name_or_path=None) -> Corpus:
    """The corpus a run names in its ``run.json``: the default text (``None`` or
    ``"pydoc_data.topics"``), ``REPEATED_TOKENS``, or a file."""
    if name_or_path == REPEATED_TOKENS:
        return repeated_tokens()
    return load_corpus(None if name_or_path == "pydoc_data.topics" else name_or_path)


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
