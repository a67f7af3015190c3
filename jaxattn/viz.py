"""Plots: attention heatmaps and line charts, written as PNG files.

Uses matplotlib's non-interactive Agg backend, so it works without a screen.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path, *, dpi: int = 100) -> Path:
    """Writes ``fig`` as a PNG at ``path`` (making the folder) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def attention_heatmap(weights, query_labels, key_labels, path, *, title: str) -> Path:
    """Saves a ``[T, S]`` weight matrix as a labelled heatmap with a colour bar.

    Rows are queries (the token that looks), columns are keys (the token looked at).
    """
    weights = np.asarray(weights, dtype=np.float32)
    T, S = weights.shape
    if len(query_labels) != T or len(key_labels) != S:
        raise ValueError(f"need {T} query and {S} key labels for weights {weights.shape}")
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * S, 0.8 + 0.7 * T), constrained_layout=True)
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(weights.max())))
    ax.set_xticks(range(S), labels=key_labels, rotation=45, ha="right")
    ax.set_yticks(range(T), labels=query_labels)
    ax.set_xlabel("key (attended-to token)")
    ax.set_ylabel("query (attending token)")
    ax.set_title(title)
    for i in range(T):
        for j in range(S):
            colour = "black" if weights[i, j] > 0.6 * weights.max() else "white"
            ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, label="attention weight")
    return _save(fig, path, dpi=120)


def attention_grid(weights, labels, path, *, layers=None, heads=None, title: str = "Attention weights") -> Path:
    """Saves a grid of heatmaps, rows = layers, columns = heads, from weights ``[L, H, T, T]``.

    ``layers`` / ``heads`` pick which to show (default: all). One (layer, head) gives a
    single large heatmap with the numbers written in. Token labels on the outer axes,
    one shared colour bar (0 to 1).
    """
    weights = np.asarray(weights, dtype=np.float32)
    L, H, T, S = weights.shape
    layers = list(range(L)) if layers is None else list(layers)
    heads = list(range(H)) if heads is None else list(heads)
    for name, chosen, count in (("layer", layers, L), ("head", heads, H)):
        bad = [i for i in chosen if not 0 <= i < count]
        if bad:
            raise ValueError(f"{name} {bad[0]} does not exist: the model has {count} {name}s (0 to {count - 1})")
    if len(labels) != T:
        raise ValueError(f"need {T} token labels for weights {weights.shape}, got {len(labels)}")
    if len(layers) == 1 and len(heads) == 1:
        return attention_heatmap(weights[layers[0], heads[0]], labels, labels, path,
                                 title=f"{title}: layer {layers[0]}, head {heads[0]}")
    cell = min(2.4, max(1.1, 0.22 * T))
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(1.2 + cell * len(heads), 1.0 + cell * len(layers)),
                             squeeze=False, constrained_layout=True)
    show_labels = T <= 24
    for row, layer in enumerate(layers):
        for column, head in enumerate(heads):
            ax = axes[row, column]
            image = ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(S), labels=labels if show_labels and row == len(layers) - 1 else [],
                          rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels=labels if show_labels and column == 0 else [], fontsize=6)
            if row == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if column == 0:
                ax.set_ylabel(f"layer {layer}\nquery", fontsize=8)
            if row == len(layers) - 1:
                ax.set_xlabel("key", fontsize=8)
    fig.colorbar(image, ax=axes, label="attention weight", shrink=0.6)
    fig.suptitle(title)
    return _save(fig, path, dpi=100)


def line_chart(series, path, *, title: str, xlabel: str, ylabel: str, logx=False, logy=False) -> Path:
    """Saves ``{label: (xs, ys)}`` as a labelled line chart with one legend."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path, dpi=120)


def training_curve(history: dict, path) -> Path:
    """The loss curve of a run: train loss and validation, both in bits per byte.

    ``history`` as ``jaxattn.lm.train`` keeps it: ``step``, ``train_loss`` (nats),
    ``val_step``, ``val_bpb`` (bits per byte).
    """
    bits = [loss / np.log(2) for loss in history["train_loss"]]
    series = {"train loss (bits/byte)": (history["step"], bits)}
    if history["val_step"]:
        series["validation (bits/byte)"] = (history["val_step"], history["val_bpb"])
    return line_chart(series, path, title="Training", xlabel="step", ylabel="bits per byte")


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
    return _save(fig, path, dpi=110)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


# ------------------------------------------------------------ attention in today's models


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
    return _save(fig, path, dpi=110)


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
    return _save(fig, path, dpi=110)


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
    _labelled(bottom, "tokens in the sequence", "KV cache, MiB (batch 1)",
              "The cache of the whole model, as jaxattn allocates it")
    return _save(fig, path, dpi=110)


def _labelled(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, a title, a light grid on both scales' ticks and a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


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
    return _save(fig, path, dpi=110)


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
    _labelled(ax, "dimension pair i (fast to slow)", "wavelength 2π / f_i (tokens)",
              "RoPE's frequencies before and after scaling")
    return _save(fig, path, dpi=110)


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
    return _save(fig, path)


def next_token_figure(labels, probabilities, path, *, title: str) -> Path:
    """The most likely next tokens and their probabilities, as bars."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2), constrained_layout=True)
    ax.bar(range(len(labels)), probabilities, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels=labels)
    for index, value in enumerate(probabilities):
        ax.text(index, value, f"{value:.1%}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("probability")
    ax.set_title(title)
    return _save(fig, path)


# ------------------------------------------------------------------ serving and decoding speed


def page_table_figure(tables: dict, references, path, *, page_size: int, shared: int) -> Path:
    """Page tables of running requests over one pool. ``tables``: ``{request: [page, ...]}``;
    ``references`` ``[pages]``: each page's holders; ``shared``: how many leading pages the
    requests share (drawn in one colour, their reference count written in)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), constrained_layout=True,
                                      gridspec_kw={"width_ratios": [1, 1.4]})
    for row, (name, pages) in enumerate(tables.items()):
        for index, page in enumerate(pages):
            colour = "#f4a261" if index < shared else "#8ecae6"
            left.add_patch(plt.Rectangle((index, row), 0.95, 0.9, color=colour))
            left.text(index + 0.47, row + 0.45, str(page), ha="center", va="center", fontsize=9)
    left.set_xlim(0, max(len(p) for p in tables.values()))
    left.set_ylim(len(tables), 0)
    left.set_yticks(np.arange(len(tables)) + 0.45, [str(name) for name in tables])
    left.set_xticks(np.arange(max(len(p) for p in tables.values())) + 0.47,
                    [f"{i * page_size}-{(i + 1) * page_size - 1}" for i in range(max(len(p) for p in tables.values()))],
                    fontsize=7)
    left.set_xlabel(f"token positions (page size {page_size})")
    left.set_title("page tables: logical page → physical page\n(orange: the shared prompt prefix)")
    references = np.asarray(references)
    held = {page for pages in tables.values() for page in pages}
    colours = ["#f4a261" if references[page] > 1 else "#8ecae6" if page in held else "#e9ecef"
               for page in range(len(references))]
    right.bar(np.arange(len(references)), references, color=colours, edgecolor="#555")
    right.set_xlabel("physical page in the pool")
    right.set_ylabel("reference count")
    right.set_title("the pool: how many requests hold each page (grey: free)")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path, dpi=110)


def batching_figure(timelines: dict, path) -> Path:
    """Gantt charts of the same requests served two ways. ``timelines``: ``{title: [(slot,
    request, first step, last step), ...]}``; one panel each, one row a slot."""
    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 1.3 + 1.1 * len(timelines) * 2), constrained_layout=True,
                             sharex=True)
    colours = plt.get_cmap("tab10")
    for ax, (title, bars) in zip(np.atleast_1d(axes), timelines.items()):
        for slot, request, first, last in bars:
            ax.barh(slot, last - first + 1, left=first, color=colours(request % 10), edgecolor="white")
            ax.text(first + (last - first + 1) / 2, slot, f"r{request}", ha="center", va="center", fontsize=8)
        ax.set_yticks(sorted({bar[0] for bar in bars}), [f"slot {s}" for s in sorted({bar[0] for bar in bars})])
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
    np.atleast_1d(axes)[-1].set_xlabel("engine step")
    return _save(fig, path, dpi=110)


def speculative_figure(steps, path, *, k: int) -> Path:
    """One request decoded with k drafted tokens a step: per step (a column), the drafts
    accepted (green), rejected (red) and the model's own token (blue) that every step adds."""
    fig, ax = plt.subplots(figsize=(min(12, max(7.5, 1.5 + 0.32 * len(steps))), 2.8), constrained_layout=True)
    for column, (drafted, accepted) in enumerate(steps):
        for row in range(drafted):
            ax.add_patch(plt.Rectangle((column, row), 0.9, 0.9, color="#2a9d8f" if row < accepted else "#e76f51"))
        ax.add_patch(plt.Rectangle((column, accepted), 0.9, 0.9, fill=False, edgecolor="#264653", lw=2))
    ax.set_xlim(0, len(steps))
    ax.set_ylim(0, k + 1)
    ax.set_xlabel("verify step (one call of the model)")
    ax.set_ylabel("draft position")
    ax.set_title("Speculative decoding: drafts accepted (green) and rejected (red);\n"
                 "the framed cell is the model's own token, which every verify step adds")
    return _save(fig, path, dpi=110)


def preemption_figure(series: dict, pool: int, preemptions: dict, path) -> Path:
    """Pages in use after every step (``{label: [...]}``), the pool's size, and the steps at
    which a request was preempted (``{label: [step, ...]}``)."""
    fig, ax = plt.subplots(figsize=(8, 3.4), constrained_layout=True)
    for label, in_use in series.items():
        line, = ax.plot(np.arange(1, len(in_use) + 1), in_use, label=label)
        for step in preemptions.get(label, []):
            ax.axvline(step, color=line.get_color(), ls=":", alpha=0.8)
    ax.axhline(pool, color="k", ls="--", label=f"pool ({pool} pages)")
    _labelled(ax, "engine step", "pages in use", "Pages in use; dotted: a request preempted (its pages freed)")
    return _save(fig, path, dpi=110)


def roofline_figure(peak_flops: float, bandwidth: float, points: dict, path) -> Path:
    """The roofline: attainable FLOP/s = min(peak, bandwidth x intensity), both measured;
    ``points``: ``{label: (FLOPs per byte, FLOP/s achieved)}``."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4), constrained_layout=True)
    intensity = np.logspace(-2, 3, 200)
    ax.plot(intensity, np.minimum(peak_flops, bandwidth * intensity), "k-", label="roof: min(peak, bandwidth × intensity)")
    ridge = peak_flops / bandwidth
    ax.axvline(ridge, color="grey", ls=":", label=f"ridge point: {ridge:.0f} FLOP/byte")
    for label, (x, y) in points.items():
        ax.plot([x], [y], "o", ms=8, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _labelled(ax, "arithmetic intensity (FLOPs per byte read)", "FLOP/s",
              f"Roofline of this machine: {peak_flops / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.1f} GB/s")
    return _save(fig, path, dpi=110)


def cache_bytes_figure(bytes_by_model: dict, path) -> Path:
    """KV-cache bytes per token: ``{model: {entry kind: bytes}}``, one group of bars a model."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    kinds = list(next(iter(bytes_by_model.values())))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        values = [sizes[kind] for sizes in bytes_by_model.values()]
        bars = ax.bar(np.arange(len(bytes_by_model)) + k * width, values, width, label=kind)
        ax.bar_label(bars, [f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_xticks(np.arange(len(bytes_by_model)) + width * (len(kinds) - 1) / 2, list(bytes_by_model))
    ax.set_yscale("log")
    _labelled(ax, "", "bytes per cached token (all layers)", "KV cache: bytes per token")
    return _save(fig, path, dpi=110)


def induction_figure(history: dict, path, *, random_loss: float) -> Path:
    """The phase change: the loss on the repeated half and the best head's induction score
    (the weight on the token right after the earlier occurrence) against the training step
    (``history["measured"]`` of a run)."""
    measured = history["measured"]
    fig, score_ax = plt.subplots(figsize=(7.5, 4), constrained_layout=True)
    score_ax.plot(measured["step"], measured["induction_score"], color="#2a9d8f", marker=".", label="induction score")
    score_ax.set_ylim(0, 1)
    score_ax.set_ylabel("best head's induction score", color="#2a9d8f")
    loss_ax = score_ax.twinx()
    loss_ax.plot(measured["step"], measured["repeated_half_loss"], color="#e76f51", marker=".", label="loss, repeated half")
    loss_ax.axhline(random_loss, color="#e76f51", ls=":", lw=1)
    loss_ax.set_ylabel("loss on the repeated half (nats)", color="#e76f51")
    loss_ax.set_ylim(bottom=0)
    score_ax.set_xlabel("training step")
    score_ax.set_title("The phase change: the loss on the repeated half falls within a few hundred steps")
    score_ax.grid(True, alpha=0.3)
    return _save(fig, path, dpi=110)
