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
- ``today.py``: step 14 (attention in today's models);
- ``serving.py``: step 15 (pages, continuous batching, speculative decoding, preemption);
- ``speed.py``: step 16 (why decoding is bound by memory bandwidth; the int8 cache);
- ``induction.py``: step 17 (an induction circuit forms during training).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from jaxattn.tour.decoding import step_attention_sink, step_decode_cost, step_kv_cache, step_next_token, tour_model
from jaxattn.tour.induction import step_induction
from jaxattn.tour.many_heads import step_multi_head, step_positions
from jaxattn.tour.mla import step_latent_attention
from jaxattn.tour.one_head import step_causal, step_packed, step_self_attention, step_tokens
from jaxattn.tour.page import DEFAULT_TEXT, Page
from jaxattn.tour.scale import step_memory, step_ring
from jaxattn.tour.serving import step_serving
from jaxattn.tour.speed import step_decoding_speed
from jaxattn.tour.today import step_todays_attention


def held_out_text(length: int = 1024) -> np.ndarray:
    """The first ``length`` + 1 bytes of the default corpus's validation part (no model of the
    tour trained on them)."""
    from jaxattn.lm.data import load_corpus

    return load_corpus().validation[: length + 1]


class Tour:
    """The tour one step at a time, for a notebook (``docs/tour.ipynb``) or a script::

        tour = Tour(out="jaxattn-tour")
        tour.next()      # runs step 1; in a notebook its text and figures show below the cell
        ...
        tour.finish()    # writes index.html; returns the arrays each step computed

    ``run_tour`` is ``Tour(...).run()``. ``result`` holds every step's numbers as they come;
    ``page`` what was printed. Steps 7-16 use a trained model (``checkpoint``, see
    ``tour_model``), step 17 a run of the induction preset (``induction_run``; default
    ``shipped_induction_run()``).
    """

    def __init__(self, text: str = DEFAULT_TEXT, *, out="jaxattn-tour", seed: int = 0, checkpoint=None, say=print,
                 generated_tokens: int = 200, induction_run=None):
        if checkpoint is not None:  # a wrong --checkpoint is an error now, not after five steps
            from jaxattn.lm.checkpoint import RunFolder

            RunFolder(checkpoint).read_run()
        self.text, self.seed, self.checkpoint = text, seed, checkpoint
        self.generated_tokens, self.induction_run = generated_tokens, induction_run
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.page = Page(say)
        self.result: dict = {}
        self.started = time.perf_counter()
        self.page(f"jaxattn tour: how attention inside an LLM works (figures and index.html in {self.out})")
        self._steps = iter(self._chapters())

    def _chapters(self):
        """Each step as a function that stores what it computed in ``result``."""
        page, r, out, seed = self.page, self.result, self.out, self.seed
        text = self.text

        def tokens():
            r["words"], r["x"] = step_tokens(page, text, width=16, seed=seed, out=out)

        def self_attention():
            r["q"], r["k"], r["v"], r["weights"], r["scaling"] = step_self_attention(page, r["words"], r["x"],
                                                                                     head_width=8, seed=seed, out=out)

        def causal():
            r["causal_mask"], r["causal_weights"], r["alignment"] = step_causal(page, r["words"], r["q"], r["k"], out=out)

        def packed():
            r["packed"] = step_packed(page, r["words"], r["q"], r["k"], np.asarray(r["causal_weights"]), out=out)

        def multi_head():
            r["multi_head"], r["one_head_loop"], r["head_weights"] = step_multi_head(
                page, r["words"], r["x"], heads=4, kv_heads=2, head_width=4, seed=seed, out=out)

        def positions():
            r["rope"] = step_positions(page, out=out)

        def kv_cache():
            self.model, self.source = tour_model(page, self.checkpoint, out)
            (r["cache_difference"], cached_s, uncached_s, r["cache_snapshots"]) = step_kv_cache(
                page, self.model, text, out=out, new=self.generated_tokens)
            r["generation_seconds"] = {"with_cache": cached_s, "recomputing": uncached_s}

        def decode_cost():
            r["decode_cost"] = step_decode_cost(page, out=out)

        def next_token():
            r["top5"] = step_next_token(page, self.model, text, self.source, out=out)

        def sink():
            r["sink"] = step_attention_sink(page, self.model, text, out=out, seed=seed)

        def latent():
            r["mla_difference"], r["cache_sizes"] = step_latent_attention(page, text, seed=seed, out=out)

        def memory():
            r["memory"], r["flash_plan"] = step_memory(page, out=out)

        def ring():
            r["ring"] = step_ring(page, out=out)

        def today():
            r["today"] = step_todays_attention(page, r["words"], r["q"], r["k"], out=out, seed=seed)

        def serving():
            r["serving"] = step_serving(page, self.model, out=out)

        def speed():
            r["speed"] = step_decoding_speed(page, self.model, held_out_text(), out=out)

        def induction():
            r["induction"] = step_induction(page, self.induction_run, out=out, seed=seed)

        return [tokens, self_attention, causal, packed, multi_head, positions, kv_cache, decode_cost, next_token,
                sink, latent, memory, ring, today, serving, speed, induction]

    def next(self) -> "StepView | None":
        """Runs the next step; returns what it printed and drew (shown inline by a notebook),
        or None when every step has run."""
        step = next(self._steps, None)
        if step is None:
            return None
        step()
        return StepView(self.page.sections[-1], self.out)

    def run(self) -> dict:
        """Every step not yet run, then ``finish``."""
        while self.next() is not None:
            pass
        return self.finish()

    def finish(self) -> dict:
        """Writes ``index.html``; returns ``result`` (with ``index``, the page's path)."""
        self.page("")
        self.result["index"] = self.page.write(self.out / "index.html")
        self.page(f"Done in {time.perf_counter() - self.started:.0f} s. The whole tour with its figures: "
                  f"{self.result['index'].resolve()}")
        return self.result


class StepView:
    """One step of the tour as a notebook shows it: its section of the page, figures inline."""

    def __init__(self, section: dict, folder: Path):
        self.section, self.folder = section, folder

    @property
    def title(self) -> str:
        return self.section["title"]

    def _repr_html_(self) -> str:
        return self.section_html()

    def section_html(self) -> str:
        return Page.section_html(self.section, images=self.folder)


def run_tour(text: str = DEFAULT_TEXT, *, out="jaxattn-tour", seed: int = 0, checkpoint=None, say=print,
             generated_tokens: int = 200, induction_run=None) -> dict:
    """Walks ``text`` through attention, step by step; figures and ``index.html`` go to ``out``.
    ``generated_tokens``: how many tokens the KV-cache step generates to time the cache.

    Returns the arrays each step computed, keyed by name.
    """
    return Tour(text, out=out, seed=seed, checkpoint=checkpoint, say=say, generated_tokens=generated_tokens,
                induction_run=induction_run).run()
