"""Looking inside a model: what each head attends to on a text.

``load_any`` opens whatever ``jaxattn inspect`` is given (a jaxattn run folder, a Hugging
Face folder or a hub id); ``capture_attention`` runs the model once, each layer computing
its weights once and sowing them (``nnx.capture``), and keeps every layer's weights for the
whole batch; ``head_roles`` measures, per layer and head, the three habits a learner
should look for in a real model:

- the **attention sink**: much weight on the first token, whatever it is (Xiao et al.
  2023, arXiv 2309.17453);
- **previous-token** heads: each token looks at the one before it (a building block of
  induction heads, Olsson et al. 2022);
- **self** attention: each token looks at itself.

Shape letters: L layers, B batch, H heads, T tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx


def load_any(name, *, dtype: str = "float32"):
    """``(model, tokenizer, description)`` for a jaxattn run folder (it holds ``run.json``),
    a Hugging Face folder (``config.json``) or a hub id."""
    from jaxattn.lm.checkpoint import RUN_FILE, RunFolder

    path = Path(name).expanduser()
    if (path / RUN_FILE).is_file():
        from jaxattn.lm.tokenizer import ByteTokenizer

        return RunFolder(path).load_model(), ByteTokenizer(), f"jaxattn run {path}"
    from jaxattn.lm.hf import LoadError, load_hf_model

    model, tokenizer = load_hf_model(name, dtype=dtype)
    if tokenizer is None:
        raise LoadError(f"{str(name)!r} has no tokenizer.json: jaxattn cannot turn text into this model's tokens")
    return model, tokenizer, f"Hugging Face {model.config.width}-wide, {model.config.layers}-layer model {name}"


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
