"""Figures of attention in today's models: soft-capping, sinks, layer patterns, NoPE and RoPE,
RoPE scaling, embeddings, the next token."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from jaxattn.viz.common import label_axes, save_figure


def softcap_figure(raw, capped, row_logits, plain_weights, capped_weights, path, *, cap: float) -> Path:
    """Logit soft-capping: the curve ``cap tanh(s / cap)`` against s, and one row's softmax
    weights without and with the cap (a dominating logit loses its monopoly)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    left.plot(raw, raw, color="grey", linestyle="--", label="no cap: s")
    left.plot(raw, capped, color="C0", label=f"{cap:g} · tanh(s / {cap:g})")
    left.axhline(cap, color="C3", linewidth=0.8)
    left.axhline(-cap, color="C3", linewidth=0.8)
    left.set_xlabel("logit s (scaled score)")
    left.set_ylabel("logit after capping")
    left.set_title(f"Soft-capping keeps every logit within ±{cap:g}")
    left.legend()
    keys = np.arange(len(row_logits))
    right.bar(keys - 0.2, plain_weights, width=0.4, label="softmax(s)")
    right.bar(keys + 0.2, capped_weights, width=0.4, label=f"softmax({cap:g} tanh(s / {cap:g}))")
    right.set_xticks(keys, labels=[f"{s:.0f}" for s in row_logits])
    right.set_xlabel("key (its logit s)")
    right.set_ylabel("attention weight")
    right.set_title("One query's row: the largest logit no longer takes all")
    right.legend()
    return save_figure(fig, path, dpi=110)


def sink_figure(plain, with_sink, sink_share, labels, path, *, sink: float) -> Path:
    """Learned sinks: one head's causal weights without and with a sink logit (rows no longer
    sum to 1), and the share each query row gives to the sink (which goes nowhere)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), constrained_layout=True,
                             gridspec_kw=dict(width_ratios=[1, 1, 0.8]))
    for ax, weights, title in ((axes[0], plain, "softmax over the keys"),
                               (axes[1], with_sink, f"with a sink logit {sink:g} in each denominator")):
        image = ax.imshow(np.asarray(weights), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels=labels)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(title)
    fig.colorbar(image, ax=axes[1], shrink=0.8, label="attention weight")
    axes[2].barh(range(len(labels)), sink_share, color="C3")
    axes[2].set_yticks(range(len(labels)), labels=labels)
    axes[2].invert_yaxis()
    axes[2].set_xlim(0, 1)
    axes[2].set_xlabel("weight the sink takes (1 − row sum)")
    axes[2].set_title("Where it goes: nowhere")
    return save_figure(fig, path, dpi=110)


def layer_pattern_figure(patterns, cache_curves, path) -> Path:
    """Local/global layer patterns (``{name: ["local" | "global", ...]}``) as coloured strips,
    and the KV cache each pattern needs against the sequence length (``{name: (lengths, MiB)}``)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), constrained_layout=True,
                                      gridspec_kw=dict(height_ratios=[1, 2]))
    for row, (name, kinds) in enumerate(patterns.items()):
        for layer, kind in enumerate(kinds):
            top.add_patch(plt.Rectangle((layer, row), 0.9, 0.8, color="C0" if kind == "global" else "C2"))
        top.text(-0.3, row + 0.4, name, ha="right", va="center", fontsize=9)
    longest = max(len(kinds) for kinds in patterns.values())
    top.set_xlim(-0.1, longest)
    top.set_ylim(len(patterns), -0.2)
    top.set_xticks(np.arange(longest) + 0.45, labels=[str(i) for i in range(longest)], fontsize=7)
    top.set_yticks([])
    top.set_xlabel("layer")
    top.set_title("blue: global (sees every earlier token), green: local (sees a window)")
    for name, (lengths, mib) in cache_curves.items():
        bottom.plot(lengths, mib, marker="o", label=name)
    bottom.set_xscale("log", base=2)
    bottom.set_yscale("log")
    label_axes(bottom, "tokens in the sequence", "KV cache, MiB (batch 1)",
              "The cache of the whole model, as jaxattn allocates it")
    return save_figure(fig, path, dpi=110)



def nope_rope_figure(distances, scores_by_encoding, path) -> Path:
    """One query and one key, placed at every distance: their score with RoPE (it changes with
    the distance) and without any position encoding (NoPE: it does not)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8), constrained_layout=True)
    for name, scores in scores_by_encoding.items():
        ax.plot(distances, scores, label=name)
    ax.set_xlabel("distance m − n between the query and the key")
    ax.set_ylabel("q · k")
    ax.set_title("The same two vectors at every distance")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=110)


def rope_scaling_figure(wavelengths, context: int, path, *, band=None) -> Path:
    """Each RoPE frequency's wavelength (tokens per full turn) by dimension pair, for the
    scalings ``{name: wavelengths}``, with the trained context marked; ``band``: the
    wavelengths ``(kept below, slowed above)`` between which llama3 scaling blends, shaded."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    for name, values in wavelengths.items():
        ax.plot(np.arange(len(values)), values, marker=".", label=name)
    ax.axhline(context, color="grey", linestyle="--", linewidth=1)
    ax.text(0, context * 1.15, f"trained context: {context:,} tokens", fontsize=8, color="grey")
    if band is not None:
        ax.axhspan(band[0], band[1], color="C3", alpha=0.12)
        ax.text(0, band[0] * 1.1, f"llama3 blends between {band[0]:,.0f} and {band[1]:,.0f} tokens", fontsize=8,
                color="C3")
    ax.set_yscale("log")
    label_axes(ax, "dimension pair i (fast to slow)", "wavelength 2π / f_i (tokens)",
              "RoPE's frequencies before and after scaling")
    return save_figure(fig, path, dpi=110)


def embedding_figure(words, token_rows, position_rows, path) -> Path:
    """Step 1: each word's embedding row, its position vector, and their sum x, all ``[T, C]``."""
    token_rows, position_rows = np.asarray(token_rows), np.asarray(position_rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.6 + 0.45 * len(words)), constrained_layout=True)
    top = float(np.abs(token_rows + position_rows).max())
    for ax, values, title in ((axes[0], token_rows, "embedding[token]"), (axes[1], position_rows, "sinusoidal position"),
                              (axes[2], token_rows + position_rows, "x = embedding + position")):
        image = ax.imshow(values, cmap="coolwarm", vmin=-top, vmax=top, aspect="auto")
        ax.set_yticks(range(len(words)), labels=words)
        ax.set_xlabel("dimension (C)")
        ax.set_title(title)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(fig, path)


def next_token_figure(labels, probabilities, path, *, title: str) -> Path:
    """The most likely next tokens and their probabilities, as bars."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2), constrained_layout=True)
    ax.bar(range(len(labels)), probabilities, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels=labels)
    for index, value in enumerate(probabilities):
        ax.text(index, value, f"{value:.1%}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("probability")
    ax.set_title(title)
    return save_figure(fig, path)
