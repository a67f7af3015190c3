"""Choosing the next token: greedy, temperature, top-k and top-p, one rule for every caller.

``generate`` draws one token per row with one key for the batch (``sample_token``); the
serving engine draws each row with its own key and its own settings (``sample_rows``). Both
filter the logits with ``filter_logits``, so a boundary (a tie with the k-th token, a
cumulative probability exactly at p) means the same in both.

Shape letters: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxattn.functional.checks import check_int, check_number


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` is greedy (argmax);
    ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose
    probability reaches p (nucleus sampling, Holtzman et al. 2020)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        check_number("temperature", self.temperature, minimum=0)
        if self.top_k is not None:
            check_int("top_k", self.top_k)
        if self.top_p is not None:
            check_number("top_p", self.top_p, above=0, maximum=1)


def filter_logits(logits, temperature, top_k, top_p):
    """The logits a sample is drawn from: ``logits / temperature`` with every token outside
    top-k and top-p at -inf (probability exactly 0).

    logits float32 ``[B, V]``; temperature float ``[B]`` (> 0); top_k int ``[B]`` (0, or V and
    more: off); top_p float ``[B]`` (1: off) -> float32 ``[B, V]``.

    Top-k keeps every token tied with the k-th largest. Top-p keeps a token when the
    probability of the tokens ranked before it is *below* p, so the kept set is the smallest
    whose total reaches p (the most likely token is always kept; among ties the lower id
    ranks first). One sort serves both.
    """
    V = logits.shape[-1]
    scaled = logits / temperature[:, None]
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V], most likely first
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
    kth = jnp.take_along_axis(ranked, (jnp.clip(top_k, 1, V) - 1)[:, None], axis=-1)  # [B, 1]
    in_top_k = (top_k[:, None] <= 0) | (ranked >= kth)
    probabilities = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probabilities, axis=-1) - probabilities  # probability of the tokens ranked ahead
    keep_ranked = in_top_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1))
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_ranked).at[rows, order].set(keep_ranked)
    return jnp.where(keep, scaled, -jnp.inf)


def sampling_arrays(sampling: Sampling, rows: int):
    """``(temperature [B], top_k [B], top_p [B])`` of one ``Sampling`` for every row (off = 0 and 1)."""
    return (jnp.full((rows,), max(sampling.temperature, 1e-6), jnp.float32),
            jnp.full((rows,), sampling.top_k or 0, jnp.int32),
            jnp.full((rows,), 1.0 if sampling.top_p is None else sampling.top_p, jnp.float32))


def sample_token(logits, key, sampling: Sampling):
    """logits float32 ``[B, V]`` -> token ids int32 ``[B]``, the batch drawn with one key
    (``filter_logits`` says which tokens may be drawn)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampling.top_k is None and (sampling.top_p is None or sampling.top_p >= 1):
        filtered = logits / sampling.temperature  # nothing to filter: no sort of the vocabulary every step
    else:
        filtered = filter_logits(logits, *sampling_arrays(sampling, logits.shape[0]))
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One token per row, each row with its own key and sampling: logits float32 ``[B, V]``,
    keys ``[B]``, temperature float ``[B]`` (0: greedy), top_k int ``[B]`` (0: off), top_p float
    ``[B]`` (1: off) -> int32 ``[B]``. A row draws what ``sample_token`` draws for it alone
    with that row's key."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, jnp.maximum(temperature, 1e-6), top_k, top_p)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
