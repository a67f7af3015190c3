"""Steps 1-4: tokens and embeddings, one head of self-attention (and why the scores are
scaled), causal attention (aligned bottom-right by positions), packed sequences."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import viz
from jaxattn.mathml import block, frac, i, o, paren, row, sqrt, sub, sup, t, under
from jaxattn.functional import (
    attention,
    attention_weights,
    causal_mask,
    sinusoidal_positions,
)

from jaxattn.functional.softmax import block_logits
from jaxattn.tour.page import format_matrix, heading, random_matrix, show


def embed_words(text: str, *, width: int, seed: int):
    """Word tokens, a seeded random embedding table and sinusoidal positions.

    Returns ``(words, vocabulary, token_ids, x [T, C], embedding rows [T, C])`` with
    ``x = embedding[token] + sinusoidal_positions``.
    """
    words = text.split()
    if not words:
        raise ValueError("the tour needs a text with at least one word")
    vocabulary = sorted(set(words))
    token_ids = jnp.array([vocabulary.index(word) for word in words])
    table = random_matrix(seed, (len(vocabulary), width)) / np.sqrt(width)  # [V, C]
    x = table[token_ids] + sinusoidal_positions(len(words), width)  # [T, C]
    return words, vocabulary, token_ids, x, table[token_ids]


def step_tokens(say, text: str, *, width: int, seed: int, out: Path):
    heading(say, "Step 1. Tokens and embeddings")
    words, vocabulary, token_ids, x, token_rows = embed_words(text, width=width, seed=seed)
    say(f"Text: {text!r}")
    say(f"Tokenized into words (split on spaces): {words}")
    say(f"Token ids (index in the sorted vocabulary {vocabulary}): {token_ids.tolist()}")
    say("Each token becomes a row of an embedding table plus a sinusoidal position vector.")
    say("In steps 1-6 every matrix is random (seeded), not learned: the mechanics do not")
    say(f"depend on training. x has shape [T, C] = {list(x.shape)}.")
    show(say, viz.embedding_figure(words, token_rows, x - token_rows, out / "embeddings.png"),
         "each word's embedding row, its position vector, and their sum: the rows attention starts from")
    return words, x


def step_self_attention(say, words, x, *, head_width: int, seed: int, out: Path):
    heading(say, "Step 2. Self-attention, one head")
    C = x.shape[1]
    wq, wk, wv = random_matrix(seed + 1, (3, C, head_width)) / np.sqrt(C)  # [C, D] each
    q, k, v = x @ wq, x @ wk, x @ wv  # [T, D]
    say(f"Three matrices [C, D] = [{C}, {head_width}] (random here, learned in a trained model)")
    say(f"project x into queries Q {list(q.shape)}, keys K {list(k.shape)} and values V {list(v.shape)}.")
    say.formula("Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V",
                block(i("Attention"), paren(i("Q"), o(","), i("K"), o(","), i("V")), o("="), i("softmax"),
                      paren(frac(row(i("Q"), sup(i("K"), i("T"))), sqrt(i("D")))), i("V")))
    scores = block_logits(q, k, scale=1 / np.sqrt(head_width))  # [T, S]: the rule every kernel forms logits by
    say("Scores Q K^T / sqrt(D): how well each query (row) matches each key (column):")
    say(format_matrix(scores, words, words))
    weights = attention_weights(q, k)  # [T, S]
    say("Softmax turns each row into weights that are positive and sum to 1:")
    say(format_matrix(weights, words, words))
    output = attention(q, k, v)  # [T, D]
    say(f"The output row of each token is its weighted sum of value rows: {list(output.shape)}.")
    show(say, viz.attention_heatmap(weights, words, words, out / "self_attention.png",
                                    title="Self-attention weights (one head)"), "the weights of one head")
    scaling = why_scale(say, out=out)
    return q, k, v, weights, scaling


def why_scale(say, *, out: Path, D: int = 512, S: int = 8, seed: int = 7):
    """One query against S keys at a large D, with and without dividing by sqrt(D)."""
    q = random_matrix(seed, (1, D))  # [1, D]: unit-variance numbers, so q·k has variance D
    k = random_matrix(seed + 1, (S, D))  # [S, D]
    scaled = attention_weights(q, k)[0]  # [S], scale 1/sqrt(D)
    raw = attention_weights(q, k, scale=1.0)[0]  # [S]

    def gradient_norm(scale):  # how much the weights move when the query moves
        return float(jnp.linalg.norm(jax.jacobian(lambda q: attention_weights(q, k, scale=scale)[0])(q)))

    norms = [gradient_norm(1.0), gradient_norm(None)]
    scores = np.asarray(q @ k.T)[0]  # [S]
    say("Why divide by sqrt(D)? A sum of D products of unit-variance numbers has variance D: at")
    say(f"D = {D} the raw scores have a standard deviation of about sqrt(D) = {np.sqrt(D):.0f} (here {scores.std():.0f}; over")
    say(f"these {S} keys they reach {scores.min():+.0f} and {scores.max():+.0f}), and softmax turns them into an almost")
    say(f"one-hot row (largest weight {float(raw.max()):.3f}) whose gradient all but vanishes")
    say(f"(|| d weights / d q || = {norms[0]:.1e}); scaled, the largest weight is {float(scaled.max()):.3f} and the")
    say(f"gradient {norms[1]:.1e}: the head can still learn.")
    path = viz.scaling_figure(np.asarray(q @ k.T)[0], np.asarray(q @ k.T)[0] / np.sqrt(D), np.asarray(raw),
                              np.asarray(scaled), norms, out / "why_scale.png", D=D)
    show(say, path, f"one query against {S} keys at D = {D}, without and with the 1/sqrt(D) scale")
    return {"raw": raw, "scaled": scaled, "gradient_norms": norms}


def step_causal(say, words, q, k, *, out: Path):
    heading(say, "Step 3. Causal attention")
    T = len(words)
    positions = jnp.arange(T)
    mask = causal_mask(positions, positions)  # [T, T]
    say("A language model predicts the next token, so a token may only look at itself")
    say("and the tokens before it. The causal mask (1 = may attend):")
    say(format_matrix(mask.astype(int), words, words, fmt="{:d}"))
    weights = attention_weights(q, k, mask=mask)  # [T, T]
    say("Masked scores are pushed to a large negative number before the softmax, so")
    say("their weight is exactly zero and every row still sums to 1:")
    say.formula("w_ij = exp(s_ij) / sum_{j' <= i} exp(s_ij')  for j <= i,  and 0 for j > i",
                block(sub(i("w"), row(i("i"), i("j"))), o("="), frac(
                    row(i("exp"), sub(i("s"), row(i("i"), i("j")))),
                    row(under(o("∑"), row(sup(i("j"), o("′")), o("≤"), i("i"))), i("exp"),
                        sub(i("s"), row(i("i"), sup(i("j"), o("′")))))),
                      t("  for "), i("j"), o("≤"), i("i"), o(","), t("  and 0 for "), i("j"), o(">"), i("i")))
    say(format_matrix(weights, words, words))
    say(f"{words[0]!r} can only attend to itself; {words[-1]!r} sees the whole sentence.")
    show(say, viz.attention_heatmap(weights, words, words, out / "causal_attention.png",
                                    title="Causal attention weights (one head)"), "causal weights: nothing above the diagonal")
    alignment = causal_alignment(say, out=out)
    return mask, weights, alignment


def causal_alignment(say, *, out: Path, cached: int = 5, T: int = 3, seed: int = 11):
    """A chunk of T queries after ``cached`` tokens: the mask by positions vs jax.nn's."""
    S = cached + T
    bottom_right = causal_mask(jnp.arange(T) + cached, jnp.arange(S))  # [T, S]
    q, k = random_matrix(seed, (1, T, 1, S)), random_matrix(seed + 1, (1, S, 1, S))  # jax.nn wants E = D
    one_hot_values = jnp.eye(S)[None, :, None, :]  # [1, S, 1, S]: the output row is the weight row
    jax_nn = jax.nn.dot_product_attention(q, k, one_hot_values, is_causal=True)[0, :, 0]  # [T, S]
    top_left = np.asarray(jax_nn) > 0
    say(f"When T < S (a chunk of {T} new tokens after {cached} cached ones), the queries are the")
    say("last T positions. jaxattn's mask comes from positions, so it is aligned bottom-right;")
    say("jax.nn.dot_product_attention(is_causal=True) aligns top-left (query i sees keys <= i)")
    wrong = int((np.asarray(bottom_right) != top_left).sum())
    say(f"and here hides {wrong} keys that the chunk's queries should see (marked ✗ in the figure).")
    show(say, viz.alignment_figure(bottom_right, top_left, out / "causal_alignment.png", cached=cached),
         f"a {T}-token chunk after {cached} cached tokens: bottom-right (right) vs top-left (wrong)")
    return {"bottom_right": bottom_right, "top_left": top_left, "cached": cached}


def step_packed(say, words, q, k, causal_weights, *, out: Path):
    """Two documents in one row: segment ids keep them apart, positions restart in each."""
    from jaxattn.functional import multi_head_attention_weights

    heading(say, "Step 4. Packed sequences: one rule for every mask")
    T = len(words)
    say("Training packs several documents into one row so that no slot is wasted on padding.")
    say("Each token then carries a segment id (which document) and its position inside its own")
    say("document. jaxattn builds every mask from one rule over those (masks.py): a query sees a")
    say("key of its own segment at the same or an earlier position, and, with a window W, not")
    say("more than W - 1 positions back:")
    say.formula("visible(i, j) = [seg_i = seg_j] and [pos_j <= pos_i] and [pos_i - pos_j < W]",
                block(i("visible"), paren(i("i"), o(","), i("j")), o("="),
                      o("["), sub(i("seg"), i("i")), o("="), sub(i("seg"), i("j")), o("]"), o("∧"),
                      o("["), sub(i("pos"), i("j")), o("≤"), sub(i("pos"), i("i")), o("]"), o("∧"),
                      o("["), sub(i("pos"), i("i")), o("−"), sub(i("pos"), i("j")), o("<"), i("W"), o("]")))
    say("Causal attention is the case of one segment; padding is a segment of its own; a cache")
    say("chunk after S cached tokens is positions S, S + 1, ... Here the sentence is packed twice")
    say(f"into one row of {2 * T} tokens: segment ids {[0] * T + [1] * T},")
    say(f"positions {list(range(T)) * 2}.")
    positions = jnp.asarray(list(range(T)) * 2)[None]  # [1, 2T]
    segments = jnp.asarray([0] * T + [1] * T)[None]  # [1, 2T]
    packed_q = jnp.concatenate([q, q])[None, :, None]  # [1, 2T, 1, D]
    packed_k = jnp.concatenate([k, k])[None, :, None]
    weights = multi_head_attention_weights(packed_q, packed_k, is_causal=True, q_positions=positions,
                                           kv_positions=positions, q_segment_ids=segments,
                                           kv_segment_ids=segments)[0, 0]  # [2T, 2T]
    weights = np.asarray(weights)
    leak = float(np.abs(weights[T:, :T]).max())
    same = max(float(np.abs(weights[:T, :T] - causal_weights).max()), float(np.abs(weights[T:, T:] - causal_weights).max()))
    say(f"The second copy puts weight {leak:g} on the first, and each copy's weights are step 3's")
    say(f"(largest difference {same:.1e}): packing changes nothing a document sees.")
    labels = [f"{word}·{segment}" for segment in (0, 1) for word in words]
    show(say, viz.attention_heatmap(weights, labels, labels, out / "packed.png",
                                    title="Two packed documents (word·segment): one block each"),
         "the sentence packed twice into one row: each document attends only to itself")
    return weights
