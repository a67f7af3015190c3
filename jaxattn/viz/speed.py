"""Figures of serving and decoding speed: page tables, batching, speculative decoding, preemption,
the roofline, cache bytes; and an induction head forming."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np

from jaxattn.viz.common import label_axes, save_figure


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
    return save_figure(fig, path, dpi=110)


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
    return save_figure(fig, path, dpi=110)


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
    return save_figure(fig, path, dpi=110)


def preemption_figure(series: dict, pool: int, preemptions: dict, path) -> Path:
    """Pages in use after every step (``{label: [...]}``), the pool's size, and the steps at
    which a request was preempted (``{label: [step, ...]}``)."""
    fig, ax = plt.subplots(figsize=(8, 3.4), constrained_layout=True)
    for label, in_use in series.items():
        line, = ax.plot(np.arange(1, len(in_use) + 1), in_use, label=label)
        for step in preemptions.get(label, []):
            ax.axvline(step, color=line.get_color(), ls=":", alpha=0.8)
    ax.axhline(pool, color="k", ls="--", label=f"pool ({pool} pages)")
    label_axes(ax, "engine step", "pages in use", "Pages in use; dotted: a request preempted (its pages freed)")
    return save_figure(fig, path, dpi=110)


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
    label_axes(ax, "arithmetic intensity (FLOPs per byte read)", "FLOP/s",
              f"Roofline of this machine: {peak_flops / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.1f} GB/s")
    return save_figure(fig, path, dpi=110)


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
    label_axes(ax, "", "bytes per cached token (all layers)", "KV cache: bytes per token")
    return save_figure(fig, path, dpi=110)


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
    return save_figure(fig, path, dpi=110)
