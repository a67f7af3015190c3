"""The plots every chapter uses: saving a figure, labelled axes, attention heatmaps and grids,
line charts. Uses matplotlib's non-interactive Agg backend, so it works without a screen."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path, *, dpi: int = 100) -> Path:
    """Writes ``fig`` as a PNG at ``path`` (making the folder) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, a title, a light grid on both scales' ticks and a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


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
    return save_figure(fig, path, dpi=120)


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
    return save_figure(fig, path, dpi=100)


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
    return save_figure(fig, path, dpi=120)


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

