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


def induction_rows(model, tokenizer, *, length: int | None = None, batch: int = 4, seed: int = 0):
    """The induction test's input for ``model``: ``(tokens [B, T], start, n)``, the random copy
    starting at ``start`` (after the BOS where the tokenizer adds one), n tokens long (default:
    50, or what the context fits)."""
    prefix = np.asarray(tokenizer.encode(""), np.int32)  # the BOS where the tokenizer adds one
    fits = (model.config.max_length - len(prefix)) // 2
    length = min(50, fits) if length is None else length
    if length > fits:
        raise ValueError(f"{len(prefix)} + 2 x {length} tokens exceed the model's context of {model.config.max_length}")
    tokens = induction_tokens(induction_candidates(tokenizer, model.config.vocab_size), length=length, batch=batch,
                              prefix=prefix, seed=seed)
    return tokens, len(prefix), length


def induction_test(model, tokenizer, *, length: int | None = None, batch: int = 4, seed: int = 0):
    """Runs the induction test on ``model``: ``(tokens [B, T], weights [L, B, H, T, T],
    scores [L, H])``. ``length``: n, the random copy (default: 50, or what the context fits)."""
    tokens, start, length = induction_rows(model, tokenizer, length=length, batch=batch, seed=seed)
    _, weights = capture_attention(model, tokens)
    return tokens, weights, induction_scores(weights, start=start, length=length)


def repeated_half_loss(logits, tokens, *, start: int, length: int) -> float:
    """Mean cross entropy (nats) of the second copy of ``induction_tokens`` rows: logits
    ``[B, T, V]`` predicting tokens ``start + n + 1 .. start + 2n - 1`` (the copy's first token
    cannot be known before it is read). log(candidates) for a model that cannot copy, near 0 for
    one that can."""
    logits = np.asarray(logits, np.float64)
    rows = np.arange(start + length + 1, start + 2 * length)
    chosen = logits[:, rows - 1]  # [B, n - 1, V]
    log_norm = np.log(np.exp(chosen - chosen.max(-1, keepdims=True)).sum(-1)) + chosen.max(-1)
    picked = np.take_along_axis(chosen, np.asarray(tokens)[:, rows, None], axis=-1)[..., 0]
    return float((log_norm - picked).mean())


def induction_measure(tokenizer, *, length: int | None = None, batch: int = 8, seed: int = 1):
    """For ``train(..., measure=)``: ``model -> {"induction_score", "repeated_half_loss"}``, the
    best head's induction score and the loss on the repeated half, on one fixed set of rows
    (``induction_rows``; seed 1, not the test's 0, so that ``inspect`` checks other rows)."""

    def measure(model) -> dict:
        tokens, start, n = induction_rows(model, tokenizer, length=length, batch=batch, seed=seed)
        logits, weights = capture_attention(model, tokens)
        return {"induction_score": float(induction_scores(weights, start=start, length=n).max()),
                "repeated_half_loss": repeated_half_loss(logits, tokens, start=start, length=n)}

    return measure


def ablate_heads(model, heads):
    """A copy of ``model`` in which each ``(layer, head)`` of ``heads`` writes nothing: its slice
    of the output projection (``w_o[h]``, ``[D, C]``) is zero, so the residual stream never sees it."""
    ablated = nnx.clone(model)
    for layer, head in heads:
        attn = ablated.blocks[layer].attn
        if not hasattr(attn, "w_o") or attn.w_o[...].ndim != 3:
            raise ValueError(f"ablate_heads needs standard attention (w_o [H, D, C]); layer {layer} is "
                             f"{type(attn).__name__}")
        if not 0 <= head < attn.w_o[...].shape[0]:
            raise ValueError(f"layer {layer} has {attn.w_o[...].shape[0]} heads, no head {head}")
        attn.w_o[...] = attn.w_o[...].at[head].set(0)
    return ablated


class Circuit(NamedTuple):
    """What copying a repeat takes in a model, found by ablation (``induction_circuit``).

    ``scores [L, H]``: induction scores; ``loss``: the loss on the repeated half (nats) with
    every head; ``ablated [L, H]``: the same loss with that one head zeroed. ``copying``: the
    head (``(layer, head)``, above layer 0) whose loss hurts most; ``offset``: where ``copying``
    looks from a token's second occurrence, in tokens after its first occurrence (+1: the token
    that followed it, the textbook induction head; the most common place). ``reads``: the heads
    of earlier layers that ``copying`` reads, as ``(layer, head)`` pairs, most needed first: the
    previous-token heads there (half or more of their weight on the token just before each
    query), or, where there is none, the one head whose loss hurts most; ``reads_previous``:
    each one's share on the previous token; ``scores_without_reads [L, H]``: the induction
    scores with all of ``reads`` zeroed (an induction head that composes with them loses its
    score)."""

    scores: np.ndarray
    loss: float
    ablated: np.ndarray
    copying: tuple[int, int]
    offset: int
    reads: tuple[tuple[int, int], ...]
    reads_previous: np.ndarray
    scores_without_reads: np.ndarray


def induction_circuit(model, tokenizer, *, seed: int = 0) -> Circuit:
    """Zeroes each head in turn (``ablate_heads``) and measures the loss on the repeated half of
    the induction test's rows: the heads without which the model can no longer copy the repeat
    are its induction circuit (Olsson et al. 2022 found it the same way). Then zeroes the
    previous-token heads it reads, together (one alone can be backed up by another), and
    measures the induction scores again. A one-layer model has none: ``ValueError``. A model
    without a circuit still gets an answer (the heads whose loss hurts most): read ``loss`` and
    ``ablated`` before calling them a circuit."""
    tokens, start, length = induction_rows(model, tokenizer, seed=seed)
    logits, weights = capture_attention(model, tokens)
    scores = induction_scores(weights, start=start, length=length)
    L, H = scores.shape
    if L < 2:
        raise ValueError("an induction circuit takes two layers; this model has one")
    ablated = np.zeros((L, H))
    for layer in range(L):
        for head in range(H):
            ablated_logits, _ = capture_attention(ablate_heads(model, [(layer, head)]), tokens)
            ablated[layer, head] = repeated_half_loss(ablated_logits, tokens, start=start, length=length)
    loss = repeated_half_loss(logits, tokens, start=start, length=length)
    copying = divmod(int(np.argmax(ablated[1:])), H)
    copying = (copying[0] + 1, copying[1])
    w = np.asarray(weights, np.float64)[copying[0], :, copying[1]]  # [B, T, T]
    rows = start + length + np.arange(1, length)
    looked = np.argmax(w[:, rows], axis=-1) - (rows - length)  # from the earlier occurrence
    values, counts = np.unique(looked, return_counts=True)
    previous = head_roles(np.asarray(weights)[:, 0]).previous  # [L, H]
    earlier = sorted(((layer, head) for layer in range(copying[0]) for head in range(H)), key=lambda lh: -ablated[lh])
    reads = tuple(lh for lh in earlier if previous[lh] >= 0.5) or earlier[:1]
    _, weights_without_reads = capture_attention(ablate_heads(model, reads), tokens)
    without = induction_scores(weights_without_reads, start=start, length=length)
    return Circuit(scores, float(loss), ablated, copying, int(values[np.argmax(counts)]), reads,
                   np.array([previous[lh] for lh in reads]), without)


def describe_circuit(circuit: Circuit) -> list[str]:
    """The circuit in words, with the losses and scores that show it."""
    (cl, ch) = circuit.copying
    where = ("the token that followed it (a textbook induction head)" if circuit.offset == 1 else
             f"{circuit.offset} tokens after it" if circuit.offset > 0 else f"{-circuit.offset} tokens before it")
    heads = " and ".join(f"layer {rl} head {rh}" for rl, rh in circuit.reads)
    each = ", ".join(f"{circuit.ablated[lh]:.2f}" for lh in circuit.reads)
    shares = ", ".join(f"{share:.0%}" for share in circuit.reads_previous)
    kind = "a previous-token head" if len(circuit.reads) == 1 else "previous-token heads"
    if circuit.reads_previous.min() < 0.5:
        kind = "not a previous-token head" if len(circuit.reads) == 1 else "not all previous-token heads"
    return [f"Loss on the repeated half: {circuit.loss:.2f} nats with every head.",
            f"Copying head: layer {cl} head {ch} (zeroed, the loss becomes {circuit.ablated[cl, ch]:.2f}); from a token's "
            f"second occurrence it looks most often at {where}; induction score {circuit.scores[cl, ch]:.2f}.",
            f"It reads {heads} (zeroed one at a time, the loss becomes {each}), with {shares} of the weight on the "
            f"token just before each query: {kind}.",
            f"With {'it' if len(circuit.reads) == 1 else 'them'} zeroed, the best induction score falls from "
            f"{circuit.scores.max():.2f} to {circuit.scores_without_reads.max():.2f} (layer {cl} head {ch}: "
            f"{circuit.scores_without_reads[cl, ch]:.2f})."]


def describe_induction(scores, *, strongest: int = 5) -> list[str]:
    """The strongest induction heads, one line each."""
    scores = np.asarray(scores)
    H = scores.shape[1]
    order = np.argsort(-scores, axis=None)[:strongest]
    return [f"layer {i // H} head {i % H}: {scores.flat[i]:.2f}" for i in order]
