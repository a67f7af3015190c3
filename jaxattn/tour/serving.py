"""Step 15, with the trained model: serving many requests at once (pages, continuous batching,
speculative decoding, preemption), each figure drawn from what the engine really did."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxattn import viz
from jaxattn.tour.page import heading, show


def engine_record(engine, prompts, max_new_tokens) -> list[dict]:
    """Runs ``engine`` (a ``jaxattn.serve.Engine``, idle) on ``prompts`` (lists of ids) with
    ``max_new_tokens`` each (a list) until all have finished, and records after every step:
    which request each slot holds (``slots``), each running request's pages (``tables``), the
    pool's reference counts (``references``), pages in use (``in_use``), the tokens each request
    got (``tokens``), the running totals ``preempted``, ``drafted`` and ``accepted``, and
    ``recomputed``: the tokens of sequences sent back to wait in that step (prefilled again).
    Requests are numbered from 0 in each call."""
    records, held = [], {}

    def record(engine):
        tables = {s.id: list(s.pages) for s in engine.running if s is not None}
        recomputed = sum(held[s.id] for s in engine.waiting if held.get(s.id))  # held pages last step, none now
        held.clear()
        held.update({s.id: s.cached for s in engine.running if s is not None})
        records.append({
            "slots": [None if s is None else s.id for s in engine.running],
            "tables": tables,
            "references": engine.pool.references.copy(),
            "in_use": engine.pool.in_use,
            "tokens": {delta.id: list(delta.tokens) for delta in engine.take_deltas()},
            "preempted": engine.stats.preempted,
            "drafted": engine.stats.drafted,
            "accepted": engine.stats.accepted,
            "recomputed": recomputed,
        })

    engine.on_step = record
    first = engine.next_id
    for prompt, new in zip(prompts, max_new_tokens):
        engine.submit(np.asarray(prompt), max_new_tokens=new)
    for _ in engine.run():
        pass
    engine.on_step = None
    for record in records:  # requests numbered from 0 in each run
        record["slots"] = [None if i is None else i - first for i in record["slots"]]
        record["tables"] = {i - first: pages for i, pages in record["tables"].items()}
        record["tokens"] = {i - first: tokens for i, tokens in record["tokens"].items()}
    return records


def slot_timeline(records) -> list[tuple[int, int, int, int]]:
    """``[(slot, request, first step, last step)]``: when each request held a slot (1-based steps)."""
    bars = {}
    for step, record in enumerate(records, start=1):
        for slot, request in enumerate(record["slots"]):
            if request is not None:
                first = bars.get((slot, request), (step, step))[0]
                bars[(slot, request)] = (first, step)
    for step, record in enumerate(records, start=1):  # a request finishing in a step held its slot in it
        for request in record["tokens"]:
            for (slot, held), (first, last) in bars.items():
                if held == request and last == step - 1:
                    bars[(slot, held)] = (first, step)
    return [(slot, request, first, last) for (slot, request), (first, last) in sorted(bars.items(), key=lambda i: i[1])]


def static_timeline(lengths, slots: int) -> list[tuple[int, int, int, int]]:
    """Static batching of the same requests: ``slots`` at a time, in order; a batch starts
    when the previous one's longest request ends, and a request of n new tokens holds its slot
    n steps (its prefill step gives the first, as in the engine)."""
    bars, start = [], 1
    for first in range(0, len(lengths), slots):
        batch = list(enumerate(lengths))[first : first + slots]
        for slot, (request, length) in enumerate(batch):
            bars.append((slot, request, start, start + length - 1))
        start += max(length for _, length in batch)
    return bars


def step_serving(say, model, *, out: Path) -> dict:
    from jaxattn.lm.generate import generate
    from jaxattn.lm.tokenizer import encode
    from jaxattn.serve import Engine

    heading(say, "Step 15. Serving many requests: pages, continuous batching, speculative decoding")
    say("A server holds many conversations at once. Giving each request a cache of the longest")
    say("text it might reach wastes most of the memory; jaxattn's engine (jaxattn serve) does what")
    say("vLLM does (Kwon et al. 2023, arXiv 2309.06180): the cache is a pool of small pages, and")
    say("each request has a page table that lists its pages in order. The attention kernel reads a")
    say("request's keys and values through its table; a page is taken when the last one fills up.")
    page_size, slots = 8, 3
    prefix = encode("The next day is bright, and ")
    endings = ["the sun", "we walk", "it rains"]
    prompts = [np.concatenate([prefix, encode(ending)]) for ending in endings]
    settings = dict(slots=slots, page_size=page_size, max_length=64, prefill_chunk=64, decode_steps=1)
    engine = Engine(model, **settings)  # one engine for the runs below: compiled once
    shared_run = engine_record(engine, prompts, [16, 16, 16])
    snapshot = next(r for r in shared_run if len(r["tables"]) == 3 and all(r["tokens"].get(i) for i in r["tables"]))
    shared = (len(prefix)) // page_size
    say(f"Three prompts start with the same {len(prefix)} bytes ({bytes(prefix.tolist()).decode()!r}), page size "
        f"{page_size}. The engine computes")
    say(f"the {shared} full pages of that prefix once and the other two requests take the same pages")
    say("(a prefix table keyed by the tokens up to each page's end); a page's reference count says")
    say("how many requests hold it, and it goes back to the pool when the count reaches 0. Page")
    say("tables after the three prompts are in:")
    for request, pages in snapshot["tables"].items():
        say(f"  request {request}: pages {pages}")
    say(f"  reference counts of the pool's first {shared + 10} pages: {snapshot['references'][:shared + 10].tolist()}")
    show(say, viz.page_table_figure({f"request {k}": v for k, v in snapshot["tables"].items()}, snapshot["references"],
                                    out / "page_tables.png", page_size=page_size, shared=shared),
         "page tables of three requests sharing a prompt prefix, and the pool's reference counts")

    lengths = [40, 6, 24, 8, 12, 30]
    many = [np.concatenate([prefix[:4], encode(f"request {i}")]) for i in range(len(lengths))]
    continuous = engine_record(engine, many, lengths)  # they share 4 bytes, less than a page: nothing is shared
    continuous_bars = slot_timeline(continuous)
    static_bars = static_timeline(lengths, slots)
    static_steps = max(bar[3] for bar in static_bars)
    busy_static = sum(bar[3] - bar[2] + 1 for bar in static_bars) / (slots * static_steps)
    busy_continuous = sum(bar[3] - bar[2] + 1 for bar in continuous_bars) / (slots * len(continuous))
    say("")
    say(f"Continuous batching. Six requests wanting {lengths} new tokens share {slots} slots. Static")
    say("batching runs them three at a time and a batch ends when its longest request does, so short")
    say("requests leave their slot idle. The engine instead admits a waiting request into any slot")
    say("the moment one frees up (Yu et al. 2022, Orca), every step:")
    say(f"  static batching (counted: a prefill step, then one per token): {static_steps} steps, slots busy "
        f"{busy_static:.0%} of the time")
    say(f"  continuous batching (the engine, as run): {len(continuous)} steps, slots busy {busy_continuous:.0%}")
    show(say, viz.batching_figure({f"static batching: {static_steps} steps": static_bars,
                                   f"continuous batching (the engine): {len(continuous)} steps": continuous_bars},
                                  out / "batching.png"),
         "the same six requests on three slots, static and continuous batching")

    k = 4
    repetitive = encode("The next day is bright. The next day is bright. The next day is bright. The next day")
    speculative = engine_record(Engine(model, **dict(settings, slots=1, max_length=128, speculative=k)), [repetitive],
                                [40])
    strip, previous = [], (0, 0)
    for record in speculative:
        drafted, accepted = record["drafted"] - previous[0], record["accepted"] - previous[1]
        previous = (record["drafted"], record["accepted"])
        if drafted or (record["tokens"] and strip):
            strip.append((drafted, accepted))
    drafted_total, accepted_total = speculative[-1]["drafted"], speculative[-1]["accepted"]
    speculative_tokens = [token for record in speculative for token in record["tokens"].get(0, [])]
    greedy_tokens = [int(t) for t in generate(model, [repetitive], max_new_tokens=40)[0]]
    say("")
    say(f"Speculative decoding (Leviathan et al. 2023). A decode step reads all the weights to")
    say(f"produce one token; checking k = {k} guessed tokens in one call costs about the same (step 16:")
    say("a decode step is bound by bytes, not arithmetic). The engine drafts by prompt lookup: it")
    say("finds the last few tokens earlier in the text and proposes what followed them. The model")
    say("keeps the drafts that equal its own greedy choice, up to the first miss, and adds its own")
    say("next token, so the text is exactly greedy decoding's. Measured on a repetitive prompt:")
    say(f"  {accepted_total} of {drafted_total} drafted tokens accepted; 40 tokens in {len(strip)} verify steps "
        f"({40 / max(1, len(strip)):.1f} tokens per call of the model, 1 without drafts);")
    say(f"  the 40 tokens {'equal' if speculative_tokens == greedy_tokens else 'DIFFER FROM'} those of plain greedy "
        "decoding (jaxattn.lm.generate).")
    show(say, viz.speculative_figure(strip, out / "speculative.png", k=k),
         "each verify step's drafts, accepted and rejected, and the model's own token")

    roomy = engine_record(engine, many[:3], [28, 28, 28])
    pool = 8  # pages left free: 64 tokens for three requests that want three times as many
    reserved = [engine.pool.take() for _ in range(engine.pool.available - pool)]  # the same engine, a smaller pool
    tight = engine_record(engine, many[:3], [28, 28, 28])
    for page in reserved:
        engine.pool.release(page)
    for record in tight:
        record["in_use"] -= len(reserved)
    moments = [step for step, (before, now) in enumerate(zip([{"preempted": 0}] + tight, tight), start=1)
               if now["preempted"] > before["preempted"]]
    recomputed = sum(record["recomputed"] for record in tight)
    say("")
    say(f"When the pages run out. With a pool of {pool} pages ({pool * page_size} tokens) for three requests that")
    say(f"grow to {len(many[0]) + 28} tokens each, a request that needs a page it cannot get preempts the latest-admitted")
    say("other one: its pages go back to the pool, it waits, and when it is admitted again its whole")
    say("text so far is prefilled anew (recompute, as vLLM does by default; swapping to host memory")
    say("is the other choice). Measured:")
    say(f"  {tight[-1]['preempted']} preemption(s), at step(s) {moments}; {recomputed} tokens computed a second time;")
    say(f"  {len(tight)} steps instead of {len(roomy)} with a pool that fits them all.")
    show(say, viz.preemption_figure({f"a pool of {pool} pages": [r["in_use"] for r in tight],
                                     "a pool that fits all three": [r["in_use"] for r in roomy]}, pool,
                                    {f"a pool of {pool} pages": moments}, out / "preemption.png"),
         "pages in use per step with a small pool (preemptions dotted) and with a big one")
    return {"tables": snapshot["tables"], "references": snapshot["references"], "shared_pages": shared,
            "static_steps": static_steps, "continuous_steps": len(continuous), "drafted": drafted_total,
            "accepted": accepted_total, "verify_steps": len(strip), "preempted": tight[-1]["preempted"],
            "recomputed": recomputed, "steps_tight": len(tight), "steps_roomy": len(roomy),
            "speculative_tokens": speculative_tokens, "greedy_tokens": greedy_tokens}
