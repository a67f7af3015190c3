"""Plots, written as PNG files: one module a part of the story.

- ``common``: saving a figure, labelled axes, attention heatmaps and grids, line charts;
- ``ideas``: the tour's figures of one idea each (the ring, scaling, heads, RoPE, the cache, MLA, flash);
- ``today``: attention in today's models (soft-capping, sinks, layer patterns, RoPE scaling);
- ``speed``: serving and decoding speed (pages, batching, speculation, the roofline), induction.

Every figure function is importable from here (``from jaxattn import viz; viz.attention_grid(...)``).
matplotlib's non-interactive Agg backend is chosen first (``common``), so it works without a screen.
"""

from jaxattn.viz.common import (  # noqa: F401
    save_figure,
    label_axes,
    attention_heatmap,
    attention_grid,
    line_chart,
    training_curve,
)
from jaxattn.viz.ideas import (  # noqa: F401
    ring_diagram,
    scaling_figure,
    head_grouping_figure,
    alignment_figure,
    rope_figure,
    kv_cache_figure,
    mla_figure,
    sink_share_figure,
    flash_figure,
)
from jaxattn.viz.today import (  # noqa: F401
    softcap_figure,
    sink_figure,
    layer_pattern_figure,
    nope_rope_figure,
    rope_scaling_figure,
    embedding_figure,
    next_token_figure,
)
from jaxattn.viz.speed import (  # noqa: F401
    page_table_figure,
    batching_figure,
    speculative_figure,
    preemption_figure,
    roofline_figure,
    cache_bytes_figure,
    induction_figure,
)
