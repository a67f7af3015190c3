"""Looking inside a model: what each head attends to on a text.

``capture_attention`` runs the model once, each layer computing
its weights once and sowing them (``nnx.capture``), and keeps every layer's weights for the
whole batch; ``head_roles`` measures, per layer and head, the three habits a learner
should look for in a real model:

- the **attention sink**: much weight on the first token, whatever it is (Xiao et al.
  2023, arXiv 2309.17453);
- **previous-token** heads: each token looks at the one before it (a building block of
  induction heads, Olsson et al. 2022);
- **self** attention: each token looks at itself;

and ``induction_test`` finds **induction heads** (Olsson et al. 2022, arXiv 2209.11895), the
heads that complete a pattern seen before (``... A B ... A`` -> ``B``): on random tokens
repeated twice, each scored by the weight a token's second occurrence puts on the token
that followed its first occurrence. ``jaxattn.lm.explorer`` draws all of it as a page.

Shape letters: L layers, B batch, H heads, T tokens, n tokens of one random copy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit
def _forward_recording_weights(model, tokens, positions):
    """``(logits, sown)``: one compiled forward pass with every layer sowing its weights."""
    forward = nnx.capture(lambda model, tokens: model(tokens, positions, record_weights=True), nnx.Intermediate)
    return forward(model, tokens)


def capture_attention(model, tokens, positions=None):
    """Runs ``model`` once on tokens ``[B, T]`` and returns ``(logits [B, T, V], weights
    [L, B, H, T, T])``: every layer's attention weights, computed once in the forward pass
    itself (``record_weights=True``: each layer sows what it averages values with; Flax's
    ``nnx.capture`` collects them), compiled. The logits are the plain forward pass's."""
    positions = None if positions is None else jnp.asarray(positions)
    logits, sown = _forward_recording_weights(model, jnp.asarray(tokens), positions)
    sown = nnx.to_pure_dict(sown)
    weights = [sown["blocks"][layer]["attn"]["attention_weights"][0] for layer in range(len(model.blocks))]
    return logits, jnp.stack(weights)  # [L, B, H, T, T]


class HeadRoles(NamedTuple):
    """Per layer and head ``[L, H]``: the mean weight a query puts on the first token, on the
    token before it and on itself, over the queries 2..T-1 (0-based), where those three are
    three different tokens (so the shares add up to at most 1)."""

    first: np.ndarray
    previous: np.ndarray
    itself: np.ndarray


def head_roles(weights) -> HeadRoles:
    """weights ``[L, H, T, T]`` (T >= 3) -> ``HeadRoles``. Queries 0 and 1 are left out:
    for them the first token is also the token itself or the one before."""
    w = np.asarray(weights, np.float64)
    T = w.shape[-1]
    if T < 3:
        raise ValueError(f"head roles need a text of at least 3 tokens, got {T}")
    rows = np.arange(2, T)
    return HeadRoles(
        first=w[..., rows, 0].mean(-1),
        previous=w[..., rows, rows - 1].mean(-1),
        itself=w[..., rows, rows].mean(-1),
    )


def describe_heads(roles: HeadRoles, *, strongest: int = 3) -> list[str]:
    """A table of every head's three shares, then the strongest examples of each habit."""
    L, H = roles.first.shape
    lines = [f"{'layer':>5} {'head':>4} {'first token':>12} {'previous':>9} {'itself':>7}"]
    for layer in range(L):
        for head in range(H):
            lines.append(f"{layer:>5} {head:>4} {roles.first[layer, head]:>12.0%} "
                         f"{roles.previous[layer, head]:>9.0%} {roles.itself[layer, head]:>7.0%}")
    lines.append("")
    for name, values, what in (
        ("first", roles.first, "attention sink: most weight on the first token, whatever it says"),
        ("previous", roles.previous, "previous-token heads: each token looks at the one before it"),
        ("itself", roles.itself, "self heads: each token looks at itself"),
    ):
        order = np.argsort(-values, axis=None)[:strongest]
        examples = ", ".join(f"layer {i // H} head {i % H} ({values.flat[i]:.0%})" for i in order)
        lines.append(f"Strongest {what}: {examples}.")
    return lines


def top_next_tokens(logits, tokenizer, k: int = 10):
    """``[(label, token id, probability)]`` of the k most likely tokens after the last position."""
    probabilities = np.asarray(jnp.exp(logits[0, -1] - jnp.max(logits[0, -1])), np.float64)
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities)[:k]
    return [(tokenizer.label(int(t)), int(t), float(probabilities[t])) for t in order]


# ------------------------------------------------------------------ induction heads


def induction_tokens(candidates, *, length: int, batch: int = 4, prefix=(), seed: int = 0) -> np.ndarray:
    """The standard induction test's input: ``batch`` rows of ``prefix`` (a BOS, where the
    model has one) and then ``length`` random tokens drawn from ``candidates`` (distinct
    within a row where there are enough), written twice: int32 ``[B, len(prefix) + 2n]``."""
    candidates = np.asarray(candidates)
    if length < 2:
        raise ValueError(f"the induction test needs at least 2 random tokens, got length={length}")
    if candidates.size < 2:
        raise ValueError(f"the induction test needs at least 2 candidate tokens, got {candidates.size}")
    rng = np.random.default_rng(seed)
    rows = [rng.choice(candidates, length, replace=candidates.size < length) for _ in range(batch)]
    prefix = np.asarray(prefix, np.int32).reshape(-1)
    return np.stack([np.concatenate([prefix, row, row]) for row in rows]).astype(np.int32)  # [B, P + 2n]


def induction_scores(weights, *, start: int, length: int) -> np.ndarray:
    """weights ``[L, B, H, T, T]`` of ``induction_tokens`` rows (the random copy starting at
    ``start``, ``length`` tokens) -> ``[L, H]``: the mean weight that the token at
    ``start + n + j`` (token j's second occurrence) puts on ``start + j + 1`` (the token after
    its first occurrence), over j = 0 .. n-1 and the batch. An ideal induction head scores 1."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 5:
        raise ValueError(f"weights must be [L, B, H, T, T], got shape {w.shape}")
    if w.shape[-1] < start + 2 * length:
        raise ValueError(f"weights over {w.shape[-1]} tokens cannot hold {start} + 2 x {length}")
    j = np.arange(length)
    return w[..., start + length + j, start + j + 1].mean(axis=(-1, 1))  # [L, H]


def induction_candidates(tokenizer, vocab_size: int) -> np.ndarray:
    """The ids the induction test draws from: printable ASCII for the byte tokenizer (random
    bytes would be no text at all), every non-special id for a checkpoint's tokenizer."""
    from jaxattn.lm.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return np.arange(33, 127)
    special = set(getattr(tokenizer, "special_ids", ()))
    return np.array([i for i in range(min(vocab_size, tokenizer.vocab_size)) if i not in special])


def induction_test(model, tokenizer, *, length: int | None = None, batch: int = 4, seed: int = 0):
    """Runs the induction test on ``model``: ``(tokens [B, T], weights [L, B, H, T, T],
    scores [L, H])``. ``length``: n, the random copy (default: 50, or what the context fits)."""
    prefix = np.asarray(tokenizer.encode(""), np.int32)  # the BOS where the tokenizer adds one
    fits = (model.config.max_length - len(prefix)) // 2
    length = min(50, fits) if length is None else length
    if length > fits:
        raise ValueError(f"{len(prefix)} + 2 x {length} tokens exceed the model's context of {model.config.max_length}")
    tokens = induction_tokens(induction_candidates(tokenizer, model.config.vocab_size), length=length, batch=batch,
                              prefix=prefix, seed=seed)
    _, weights = capture_attention(model, tokens)
    return tokens, weights, induction_scores(weights, start=len(prefix), length=length)


def describe_induction(scores, *, strongest: int = 5) -> list[str]:
    """The strongest induction heads, one line each."""
    scores = np.asarray(scores)
    H = scores.shape[1]
    order = np.argsort(-scores, axis=None)[:strongest]
    return [f"layer {i // H} head {i % H}: {scores.flat[i]:.2f}" for i in order]
