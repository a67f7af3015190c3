"""The guided tour: one sentence through every step of attention.

``jaxattn tour`` runs ``run_tour``. Each step is a function that prints what it does,
draws its figures from what it really computed, and returns the numbers, so that the
tests can check what the learner sees. ``Page`` keeps everything printed and writes it,
with the figures in place, as one self-contained ``index.html``. One file a chapter:

- ``page.py``: the page, and the helpers every step shares;
- ``one_head.py``: steps 1-4 (tokens, one head, causal, packed sequences);
- ``many_heads.py``: steps 5-6 (multi-head attention, RoPE);
- ``decoding.py``: steps 7-10 (the KV cache, decode cost, the next token, the attention sink);
- ``mla.py``: step 11 (multi-head latent attention);
- ``scale.py``: steps 12-13 (memory-efficient attention, ring attention);
- ``today.py``: step 14 (attention in today's models).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from jaxattn.tour.decoding import step_attention_sink, step_decode_cost, step_kv_cache, step_next_token, tour_model
from jaxattn.tour.many_heads import step_multi_head, step_positions
from jaxattn.tour.mla import step_latent_attention
from jaxattn.tour.one_head import step_causal, step_packed, step_self_attention, step_tokens
from jaxattn.tour.page import DEFAULT_TEXT, Page
from jaxattn.tour.scale import step_memory, step_ring
from jaxattn.tour.today import step_todays_attention


def run_tour(text: str = DEFAULT_TEXT, *, out="jaxattn-tour", seed: int = 0, checkpoint=None, say=print,
             generated_tokens: int = 200) -> dict:
    """Walks ``text`` through attention, step by step; figures and ``index.html`` go to ``out``.
    ``generated_tokens``: how many tokens the KV-cache step generates to time the cache.

    Returns the arrays each step computed, keyed by name.
    """
    if checkpoint is not None:  # a wrong --checkpoint is an error now, not after five steps
        from jaxattn.lm.checkpoint import RunFolder

        RunFolder(checkpoint).read_run()
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = Page(say)
    page(f"jaxattn tour: how attention inside an LLM works (figures and index.html in {out})")
    words, x = step_tokens(page, text, width=16, seed=seed, out=out)
    q, k, v, weights, scaling = step_self_attention(page, words, x, head_width=8, seed=seed, out=out)
    mask, causal_weights, alignment = step_causal(page, words, q, k, out=out)
    packed = step_packed(page, words, q, k, np.asarray(causal_weights), out=out)
    together, one_by_one, head_weights = step_multi_head(page, words, x, heads=4, kv_heads=2, head_width=4, seed=seed,
                                                         out=out)
    positions = step_positions(page, out=out)
    model, source = tour_model(page, checkpoint, out)
    cache_difference, cached_s, uncached_s, snapshots = step_kv_cache(page, model, text, out=out, new=generated_tokens)
    decode_cost = step_decode_cost(page, out=out)
    top5 = step_next_token(page, model, text, source, out=out)
    sink = step_attention_sink(page, model, text, out=out, seed=seed)
    mla_difference, cache_sizes = step_latent_attention(page, text, seed=seed, out=out)
    memory, flash_plan = step_memory(page, out=out)
    ring = step_ring(page, out=out)
    today = step_todays_attention(page, words, out=out, seed=seed)
    page("")
    index = page.write(out / "index.html")
    page(f"Done in {time.perf_counter() - started:.0f} s. The whole tour with its figures: {index.resolve()}")
    return {
        "cache_difference": cache_difference,
        "packed": packed,
        "decode_cost": decode_cost,
        "sink": sink,
        "ring": ring,
        "generation_seconds": {"with_cache": cached_s, "recomputing": uncached_s},
        "mla_difference": mla_difference,
        "memory": memory,
        "flash_plan": flash_plan,
        "today": today,
        "top5": top5,
        "words": words,
        "x": x,
        "q": q,
        "k": k,
        "v": v,
        "weights": weights,
        "scaling": scaling,
        "causal_mask": mask,
        "causal_weights": causal_weights,
        "alignment": alignment,
        "multi_head": together,
        "one_head_loop": one_by_one,
        "head_weights": head_weights,
        "rope": positions,
        "cache_snapshots": snapshots,
        "cache_sizes": cache_sizes,
        "index": index,
    }
