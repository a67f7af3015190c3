"""The tour's figures of one idea each: the ring, scaling, head grouping, alignment, RoPE, the KV
cache, MLA, sinks, the flash kernel's block plan."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np

from jaxattn.viz.common import save_figure


def ring_diagram(n: int, work: dict, path) -> Path:
    """Ring attention in two panels: which key/value chunk each of n devices holds at each
    step (a chunk moves one device to the right per step), and how much causal work each
    device does for each layout (``work``: ``{layout: [sub-block pairs per device]}``)."""
    fig, (grid_ax, bar_ax) = plt.subplots(1, 2, figsize=(11.5, 4.2), constrained_layout=True,
                                          gridspec_kw={"width_ratios": [1, 1.25]})
    holds = np.array([[(device - step) % n for device in range(n)] for step in range(n)])  # [step, device]
    grid_ax.imshow(holds, cmap="tab10" if n <= 10 else "tab20", vmin=0, vmax=max(9, n - 1))
    for step in range(n):
        for device in range(n):
            grid_ax.text(device, step, f"K,V {holds[step, device]}", ha="center", va="center", fontsize=7, color="white")
    grid_ax.set_xticks(range(n), labels=[f"device {d}" for d in range(n)], rotation=45, ha="right")
    grid_ax.set_yticks(range(n), labels=[f"step {s}" for s in range(n)])
    grid_ax.set_title("Key/value chunk each device attends to\n(its queries stay; the chunks pass to the right)")
    width = 0.8 / max(1, len(work))
    for index, (layout, per_device) in enumerate(work.items()):
        bar_ax.bar(np.arange(n) + (index - (len(work) - 1) / 2) * width, per_device, width, label=layout)
    bar_ax.set_xticks(range(n), labels=[f"device {d}" for d in range(n)], rotation=45, ha="right")
    bar_ax.set_ylabel("query x key sub-blocks computed (forward)")
    bar_ax.set_title("Causal work per device: the slowest device sets the step")
    bar_ax.legend()
    return save_figure(fig, path, dpi=110)


def scaling_figure(scores_raw, scores_scaled, weights_raw, weights_scaled, gradient_norms, path, *, D: int) -> Path:
    """Why scores are divided by sqrt(D): one query's scores and softmax weights over S keys
    without and with the scaling, and the size of the gradient that reaches the query."""
    S = len(scores_raw)
    keys = np.arange(S)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    axes[0].bar(keys - 0.2, scores_raw, 0.4, label="q·k (unscaled)")
    axes[0].bar(keys + 0.2, scores_scaled, 0.4, label="q·k / sqrt(D)")
    axes[0].set_title(f"Scores of one query, D = {D}")
    axes[0].set_xlabel("key")
    axes[0].legend()
    axes[1].bar(keys - 0.2, weights_raw, 0.4, label="softmax(q·k): saturated")
    axes[1].bar(keys + 0.2, weights_scaled, 0.4, label="softmax(q·k / sqrt(D))")
    axes[1].set_title("Attention weights (each set sums to 1)")
    axes[1].set_xlabel("key")
    axes[1].set_ylim(0, 1.05)
    axes[1].legend()
    axes[2].bar(["unscaled", "scaled"], gradient_norms, color=["tab:blue", "tab:orange"])
    axes[2].set_yscale("log")
    axes[2].set_title("How much the weights respond to the query\n|| d weights / d q || (log scale)")
    for i, value in enumerate(gradient_norms):
        axes[2].text(i, value, f"{value:.1e}", ha="center", va="bottom")
    return save_figure(fig, path)


def head_grouping_figure(weights, labels, path, *, kv_heads: int) -> Path:
    """Every head's weights side by side ``[H, T, T]`` and GQA's grouping: which query
    heads share which key/value head."""
    weights = np.asarray(weights, np.float32)
    H, T, _ = weights.shape
    group = H // kv_heads
    fig = plt.figure(figsize=(2.4 * H + 3.8, 3.4), constrained_layout=True)
    grid = fig.add_gridspec(1, H + 1, width_ratios=[1] * H + [1.6])
    colours = plt.get_cmap("tab10")
    for h in range(H):
        ax = fig.add_subplot(grid[0, h])
        image = ax.imshow(weights[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h} (K/V {h // group})", color=colours(h // group))
        ax.set_xticks(range(T), labels=labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels=labels if h == 0 else [], fontsize=7)
    fig.colorbar(image, ax=fig.axes, shrink=0.7, label="attention weight")
    ax = fig.add_subplot(grid[0, H])
    for h in range(H):
        ax.plot([0, 1], [h, (h // group) * group + (group - 1) / 2], color=colours(h // group), lw=2)
        ax.text(-0.05, h, f"query head {h}", ha="right", va="center", fontsize=8)
    for kv in range(kv_heads):
        ax.text(1.05, kv * group + (group - 1) / 2, f"K/V head {kv}", ha="left", va="center", fontsize=8,
                color=colours(kv))
    ax.set_xlim(-0.9, 1.9)
    ax.set_ylim(H - 0.5, -0.5)
    ax.axis("off")
    ax.set_title(f"GQA: {group} query heads\nshare each K/V head", fontsize=10)
    return save_figure(fig, path)


def alignment_figure(bottom_right, top_left, path, *, cached: int) -> Path:
    """A chunk of T queries after ``cached`` tokens: the causal mask by positions (bottom-right,
    jaxattn) next to the index-based one (top-left), with the cells that differ marked."""
    bottom_right, top_left = np.asarray(bottom_right, bool), np.asarray(top_left, bool)
    T, S = bottom_right.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), constrained_layout=True)
    for ax, mask, title in ((axes[0], bottom_right, "by positions (jaxattn): query i sees keys <= cached + i"),
                            (axes[1], top_left, "top-left (jax.nn is_causal=True): query i sees keys <= i")):
        ax.imshow(mask, cmap="Greens", vmin=0, vmax=1.4)
        for i in range(T):
            for j in range(S):
                wrong = mask[i, j] != bottom_right[i, j]
                ax.text(j, i, "✗" if wrong else ("1" if mask[i, j] else "0"), ha="center", va="center",
                        color="red" if wrong else "black", fontsize=11 if wrong else 9)
        ax.axvline(cached - 0.5, color="grey", ls="--")
        ax.set_xticks(range(S), labels=[f"{j}{' (new)' if j >= cached else ''}" for j in range(S)], rotation=45, ha="right")
        ax.set_yticks(range(T), labels=[f"query at {cached + i}" for i in range(T)])
        ax.set_xlabel("key position (left of the line: in the cache)")
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def rope_figure(pair_points, scores_by_style, path, *, pair: int, D: int) -> Path:
    """RoPE: one pair of dimensions of a vector rotated at positions 0..N-1 (points on a
    circle), and q·k after rotation over (m, n) for each pairing: constant along diagonals."""
    points = np.asarray(pair_points)
    fig, axes = plt.subplots(1, 1 + len(scores_by_style), figsize=(4.3 * (1 + len(scores_by_style)), 4),
                             constrained_layout=True)
    ax = axes[0]
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, len(points)))
    for m, (x, y) in enumerate(points):
        ax.annotate("", xy=(x, y), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=colours[m]))
        ax.text(x * 1.12, y * 1.12, str(m), ha="center", va="center", fontsize=7)
    radius = np.abs(points).max() * 1.3
    ax.set_xlim(-radius, radius)
    ax.set_ylim(-radius, radius)
    ax.set_aspect("equal")
    ax.set_title(f"Pair {pair} of D = {D} at positions 0..{len(points) - 1}:\nthe same vector, rotated by m·θ_{pair}")
    for ax, (style, scores) in zip(axes[1:], scores_by_style.items()):
        image = ax.imshow(np.asarray(scores), cmap="coolwarm")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # positions are whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("key position n")
        ax.set_ylabel("query position m")
        ax.set_title(f"rope(q, m) · rope(k, n), pairing {style!r}:\ndepends only on m − n")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(fig, path)


def kv_cache_figure(snapshots, step_seconds, path) -> Path:
    """The cache of a ragged batch over a few decode steps (``snapshots``: ``[(title, lengths
    [B], capacity)]``; slots coloured by when they were written, with a legend), and the time of one
    generated token with and without the cache (``step_seconds``: ``{label: seconds}``)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(snapshots) + 1, figsize=(3.3 * len(snapshots) + 3.6, 3.3), constrained_layout=True)
    slot_colours = ["white", "#9ecae1", "#fd8d3c"]  # empty, written before, written by this call
    before = np.zeros(len(snapshots[0][1]), int)
    for ax, (title, lengths, capacity) in zip(axes, snapshots):
        lengths = np.asarray(lengths)
        slots = np.arange(capacity)[None]
        grid = np.where(slots < before[:, None], 1, np.where(slots < lengths[:, None], 2, 0))  # [B, capacity]
        before = lengths
        ax.imshow(grid, cmap=ListedColormap(slot_colours), vmin=0, vmax=2, aspect="auto")
        for b in range(len(lengths)):
            ax.axhline(b + 0.5, color="black", linewidth=0.5)
        for b, n in enumerate(lengths):
            ax.text(capacity - 0.5, b, f" lengths[{b}] = {n}", va="center", ha="left", fontsize=8)
        ax.set_xticks(range(capacity))
        ax.set_yticks(range(len(lengths)), labels=[f"row {b}" for b in range(len(lengths))])
        ax.set_xlabel("slot (= position)")
        ax.set_xlim(-0.5, capacity + 3.5)
        ax.set_title(title, fontsize=9)
    fig.legend([Patch(facecolor=c, edgecolor="black") for c in slot_colours],
               ["empty slot", "written by an earlier call", "written by this call"], loc="outside lower center",
               ncol=3, fontsize=8)
    ax = axes[-1]
    labels, seconds = list(step_seconds), [step_seconds[k] * 1e3 for k in step_seconds]
    ax.bar(labels, seconds, color=["tab:green", "tab:red"][: len(labels)])
    for i, value in enumerate(seconds):
        ax.text(i, value, f"{value:.2f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per generated token")
    ax.set_title("Cost of a step", fontsize=9)
    return save_figure(fig, path)


def mla_figure(flows, cache_sizes, path) -> Path:
    """MLA's paths as data flows (``flows``: ``{title: [(label, shape, kind)]}``, kind in
    {"input", "cached", "weight", "computed"}), and the cache size per token and layer of
    MHA, GQA, MQA and MLA (``cache_sizes``: ``{name: numbers}``)."""
    colours = {"input": "#dddddd", "cached": "#f4a261", "weight": "#a8dadc", "computed": "#ffffff"}
    columns = 2
    rows = -(-(len(flows) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(13, 6.2 * rows), constrained_layout=True, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(flows) + 1 :]:
        ax.axis("off")
    for ax, (title, flow) in zip(axes, flows.items()):
        for row, (label, shape, kind) in enumerate(flow):
            y = len(flow) - 1 - row
            ax.add_patch(plt.Rectangle((0.01, y + 0.1), 0.98, 0.8, facecolor=colours[kind], edgecolor="black"))
            ax.text(0.5, y + 0.5, f"{label}\n{shape}", ha="center", va="center", fontsize=11.5, linespacing=1.45,
                    wrap=True)
            if row:
                ax.annotate("", xy=(0.5, y + 0.88), xytext=(0.5, y + 1.12), arrowprops=dict(arrowstyle="->"))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, max(len(f) for f in flows.values()))
        ax.axis("off")
        ax.set_title(title, fontsize=13)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black") for c in colours.values()]
    legend = {"input": "input", "cached": "cached", "weight": "where W_uk and W_uv are applied", "computed": "computed"}
    fig.legend(handles, [legend[kind] for kind in colours], loc="outside lower center", fontsize=12, ncol=4)
    names, sizes = [name.replace(" (", "\n(") for name in cache_sizes], list(cache_sizes.values())
    bars = axes[len(flows)]
    bars.bar(names, sizes, color=["tab:blue", "tab:cyan", "tab:purple", "tab:orange"][: len(names)])
    bars.set_yscale("log")
    for i, value in enumerate(sizes):
        bars.text(i, value, f"{value:,}", ha="center", va="bottom", fontsize=11)
    bars.tick_params(labelsize=11)
    bars.set_ylabel("numbers cached per token and layer (log)", fontsize=12)
    bars.set_title("Cache size, DeepSeek-V2's dimensions", fontsize=13)
    return save_figure(fig, path)


def sink_share_figure(first, first_untrained, weights, labels, path, *, layer: int, head: int) -> Path:
    """The attention sink: every head's mean weight on the first token (``first`` and
    ``first_untrained``, ``[L, H]``), trained and untrained, and one head's map ``[T, T]``."""
    first, first_untrained = np.asarray(first), np.asarray(first_untrained)
    L, H = first.shape
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True, gridspec_kw={"width_ratios": [1, 1, 1.5]})
    top = max(float(first.max()), float(first_untrained.max()), 1e-6)
    for ax, values, title in ((axes[0], first, "trained"), (axes[1], first_untrained, "untrained (random weights)")):
        image = ax.imshow(values, cmap="magma", vmin=0, vmax=top)
        for l in range(L):
            for h in range(H):
                ax.text(h, l, f"{values[l, h]:.0%}", ha="center", va="center", fontsize=9,
                        color="black" if values[l, h] > 0.6 * top else "white")
        ax.set_xticks(range(H), labels=[f"head {h}" for h in range(H)])
        ax.set_yticks(range(L), labels=[f"layer {l}" for l in range(L)])
        ax.set_title(f"Weight on the first token, {title}")
    fig.colorbar(image, ax=axes[:2], shrink=0.8, label="mean weight on the first token")
    weights = np.asarray(weights)
    axes[2].imshow(weights, cmap="viridis", vmin=0, vmax=1)
    axes[2].set_xticks(range(len(labels)), labels=labels, fontsize=7)
    axes[2].set_yticks(range(len(labels)), labels=labels, fontsize=7)
    axes[2].set_xlabel("key")
    axes[2].set_ylabel("query")
    axes[2].set_title(f"Layer {layer} head {head}, trained: the first column is the sink")
    return save_figure(fig, path)


def flash_figure(visible, complete, memory_rows, path, *, T: int, block_q: int, block_kv: int) -> Path:
    """The flash kernel's plan for a causal call (block pairs skipped, visited with a mask,
    visited whole) and compiled memory of the dense and flash kernels vs T (log-log)."""
    visible, complete = np.asarray(visible, bool), np.asarray(complete, bool)
    plan = np.where(complete, 2, np.where(visible, 1, 0))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colours = matplotlib.colors.ListedColormap(["#eeeeee", "#f4a261", "#2a9d8f"])
    axes[0].imshow(plan, cmap=colours, vmin=0, vmax=2)
    axes[0].set_xlabel(f"key block ({block_kv} keys)")
    axes[0].set_ylabel(f"query block ({block_q} queries)")
    axes[0].set_title(f"Causal T = {T}: {int(complete.sum())} blocks whole, {int((visible & ~complete).sum())} "
                      f"masked,\n{int((~visible).sum())} skipped of {plan.size}")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c) for c in colours.colors]
    axes[0].legend(handles, ["skipped", "visited, masked", "visited whole"], fontsize=8, loc="upper right")
    Ts = [row[0] for row in memory_rows]
    axes[1].plot(Ts, [row[1] / 2**20 for row in memory_rows], marker="o", label="dense kernel")
    axes[1].plot(Ts, [row[2] / 2**20 for row in memory_rows], marker="o", label="flash kernel")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("sequence length T")
    axes[1].set_ylabel("compiled temporary memory (MiB)")
    axes[1].set_title("Memory: T² for dense, T for flash")
    axes[1].grid(True, which="both", alpha=0.3)
    axes[1].legend()
    return save_figure(fig, path)
