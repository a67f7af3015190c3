"""The serving engine: every request's greedy output is what `generate` gives it alone,
token for token (with speculative decoding too, by prompt lookup or a draft model, and when
the pool is so small that sequences are preempted); pages come back and are reused; prefix pages are shared and
never written by a sharer; `generate --requests` serves a JSON-lines file."""

import json
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.cli import main
from jaxattn.functional.kv_cache import TRASH_PAGE
from jaxattn.lm.sampling import filter_logits
from jaxattn.serve import PagePool
from jaxattn.lm.sampling import sample_rows
from jaxattn.serve import Engine
from jaxattn.serve.runner import bucket
from jaxattn.lm.generate import Sampling, Stopping, generate, sample_token
from jaxattn.nn import TransformerConfig, TransformerLM




@pytest.fixture(scope="module")
def model():
    # Untied embeddings: a tiny random model with tied ones mostly repeats its last token,
    # which would hide a wrong cache read.
    config = TransformerConfig(vocab_size=61, width=24, layers=2, heads=4, kv_heads=2, head_dim=6, mlp_hidden=40,
                               max_length=96, tied_embeddings=False)
    return TransformerLM(config, rngs=nnx.Rngs(0))


def plain_generate(model, requests, stopping, cache_dtype=None):
    """What `generate` gives each request: one ragged batch (a test of generate checks that a
    row of a ragged batch is what the prompt gives alone), each row cut at its own limit
    and end token."""
    longest = max(n for _, n in requests)
    tokens = np.asarray(generate(model, [prompt for prompt, _ in requests], max_new_tokens=longest, stopping=stopping,
                                 cache_dtype=cache_dtype))
    rows = [row[:n] for row, (_, n) in zip(tokens, requests)]
    return [row[: stopping.lengths(row[None])[0]].tolist() for row in rows]


@pytest.fixture(scope="module")
def requests_and_references(model):
    """40 requests of mixed prompt (2-40 tokens) and output (1-24 tokens) lengths, an end
    token that some of them write, and what `generate` gives each."""
    rng = np.random.default_rng(0)
    requests = [(rng.integers(1, 61, int(rng.integers(2, 41))).astype(np.int32), int(rng.integers(1, 25)))
                for _ in range(40)]
    free = plain_generate(model, requests, Stopping())
    middles = np.concatenate([row[2:-2] for row in free if len(row) > 4])  # tokens written mid-way
    stopping = Stopping((int(np.bincount(middles).argmax()),), 0)
    references = plain_generate(model, requests, stopping)
    assert sum(stopping.ids[0] in r for r in references) >= 3  # some requests do stop at the end token
    return requests, references, stopping


def check_pages(engine):
    """The pool's accounting after a step: a page a running sequence holds is neither free nor
    cached (so it cannot be handed out again), its reference count is the number of sequences
    holding it, only a registered prefix page is held by two sequences, and no sequence holds
    the trash page or a page twice, and a waiting sequence holds none. A draft model's pools never hold more of a sequence than
    the model's (rejected drafts are rolled back)."""
    pool = engine.pool
    running = [sequence for sequence in engine.running if sequence is not None]
    held = Counter(page for sequence in running for page in sequence.pages)
    assert not set(held) & set(pool.cached), "a held page is in the cache of released pages"
    assert not set(held) & set(pool.free), "a held page is on the free list"
    assert TRASH_PAGE not in held
    for page in range(pool.pages):
        assert pool.references[page] == held.get(page, 0), (page, pool.references[page], held.get(page, 0))
    for page, holders in held.items():
        assert holders == 1 or page in pool.page_prefix, f"page {page} in {holders} sequences is not a prefix page"
    assert not any(sequence.pages for sequence in engine.waiting), "a waiting (preempted) sequence holds pages"
    for sequence in running:
        assert len(set(sequence.pages)) == len(sequence.pages), sequence.pages
        assert sequence.draft_cached <= sequence.cached, (sequence.draft_cached, sequence.cached)


def serve(engine, requests):
    """Serves the requests, checking the pages after every step (and whatever ``on_step`` checked)."""
    watch = engine.on_step
    engine.on_step = lambda e: (check_pages(e), watch and watch(e))
    for prompt, n in requests:
        engine.submit(prompt, max_new_tokens=n)
    return {result.id: result for result in engine.run()}


@pytest.mark.parametrize("speculative", [0, 3])
def test_every_request_gets_what_generate_gives_it_alone(model, requests_and_references, speculative):
    requests, references, stopping = requests_and_references
    engine = Engine(model, slots=5, page_size=4, prefill_chunk=8, stopping=stopping, speculative=speculative)
    results = serve(engine, requests)
    for index, reference in enumerate(references):
        assert results[index].tokens == reference, index
        assert results[index].finish_reason == ("eos" if reference[-1] in stopping.ids else "length")
    assert engine.pool.in_use == 0 and engine.pool.available == engine.pool.pages - 1  # every page came back
    if speculative:
        assert engine.stats.accepted > 0
        assert engine.stats.calls < 0.8 * 400  # fewer calls than tokens: drafts were accepted
    held = np.array(engine.stats.memory)  # (pages x page size, tokens held) after every step
    assert np.all(held[:, 0] <= held[:, 1] + 5 * (4 + 4 + speculative))  # at most ~a page and the lookahead per slot


def test_int8_pools_serve_what_generate_gives_with_an_int8_cache(model, requests_and_references):
    """Pages of int8 entries (a scale per token and head) hold the same numbers as generate's int8
    cache, so the greedy outputs agree token for token (speculative steps and chunks included)."""
    requests, _, stopping = requests_and_references
    requests = requests[:8]
    engine = Engine(model, slots=4, page_size=4, prefill_chunk=8, stopping=stopping, speculative=3, cache_dtype="int8")
    assert type(engine.runner.cache[0].k).__name__ == "Int8Tokens"
    results = serve(engine, requests)
    references = plain_generate(model, requests, stopping, cache_dtype="int8")
    assert [results[index].tokens for index in range(len(requests))] == references


def test_warmed_up_serving_compiles_nothing_more(model, requests_and_references):
    requests, references, stopping = requests_and_references
    engine = Engine(model, slots=2, page_size=4, prefill_chunk=4, stopping=stopping, speculative=3)
    # rows 1, 2 x (tokens 4: a chunk; 1: a step) and (2, 4: verify 1 + 3, bucketed; 4 again, all positions)
    assert engine.warm_up() == 2 * 4
    compiled = sum(forward._cache_size() for forward in engine.runner.forward.values())  # split and unsplit
    results = serve(engine, requests[:4])
    assert [results[index].tokens for index in range(4)] == references[:4]
    assert sum(forward._cache_size() for forward in engine.runner.forward.values()) == compiled
    # one slot, several decode steps a call, calls queued behind calls in flight: one program each
    engine = Engine(model, slots=1, page_size=4, prefill_chunk=4, stopping=stopping, decode_steps=8)
    assert engine.warm_up() == 1 * 3  # rows 1 x (tokens 4, 1, and 8 steps)

    def programs():
        return sum(forward._cache_size() for calls in (engine.runner.forward, engine.runner.forward_steps)
                   for forward in calls.values())

    compiled = programs()
    results = serve(engine, requests[:4])
    assert [results[index].tokens for index in range(4)] == references[:4]
    assert programs() == compiled


def test_many_prompts_at_once_are_prefilled_in_smaller_chunks_with_the_same_tokens(model, requests_and_references):
    # chunks of 32, but a call computes at most 64 tokens: rows 1 and 2 take chunks of 32, rows 3-4 of 16
    requests, references, stopping = requests_and_references
    engine = Engine(model, slots=4, page_size=4, prefill_chunk=32, prefill_tokens=64, stopping=stopping)
    assert engine.warm_up() == (2 + 1 + 1) * 2 + (1 + 1 + 1)  # (chunks, a step, several steps) of rows 1, 2; 4
    compiled = sum(forward._cache_size() for forward in engine.runner.forward.values())
    calls, call = [], engine.runner.call

    def recorded_call(rows, T, **options):
        calls.append((bucket(len(rows), engine.slots), T))
        return call(rows, T, **options)

    engine.runner.call = recorded_call
    results = serve(engine, requests[:12])
    assert [results[index].tokens for index in range(12)] == references[:12]
    prefills = {(R, T) for R, T in calls if T > 1}
    assert max(R * T for R, T in prefills) <= 64 and (4, 16) in prefills and (1, 32) in prefills
    assert sum(forward._cache_size() for forward in engine.runner.forward.values()) == compiled


def test_a_draft_model_drafts_and_the_output_is_still_plain_greedy(model, requests_and_references):
    requests, references, stopping = requests_and_references
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = nnx.merge(graphdef, jax.tree.unflatten(treedef, [x * (1 + 0.05 * jax.random.normal(key, x.shape, x.dtype))
                                                             for x, key in zip(leaves, keys)]))
    # The model drafting for itself (every draft is what it would say), and a noisy copy of it
    # (most drafts right, some rejected and rolled back).
    for draft_model in (model, noisy):
        engine = Engine(model, slots=2, page_size=4, pages=5 * 24 + 1, prefill_chunk=8, stopping=stopping,
                        speculative=3, draft_model=draft_model)  # 2 slots, the pool of 5: shapes compiled above
        results = serve(engine, requests[:12])
        assert [results[index].tokens for index in range(12)] == references[:12]
        drafted, accepted = engine.stats.drafted, engine.stats.accepted
        assert drafted > 40 and engine.pool.in_use == 0
        if draft_model is model:
            assert accepted >= 0.9 * drafted  # all but near-ties (a call of other shapes rounds differently)
        else:
            assert 0.2 * drafted < accepted < drafted
    with pytest.raises(ValueError, match="give speculative >= 1"):
        Engine(model, draft_model=noisy)
    other = TransformerLM(TransformerConfig(vocab_size=50, width=16, layers=1, heads=2, head_dim=8, mlp_hidden=24,
                                            max_length=96), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(50\) is not the model's \(61\)"):
        Engine(model, speculative=2, draft_model=other)


def test_a_small_pool_reuses_pages_and_preempts_without_changing_outputs(model, requests_and_references):
    requests, references, stopping = requests_and_references
    engine = Engine(model, slots=4, page_size=4, pages=30, prefill_chunk=8, stopping=stopping)
    used = set()
    engine.on_step = lambda e: used.update(p for s in e.running if s is not None for p in s.pages)
    results = serve(engine, requests[:16])
    assert [results[i].tokens for i in range(16)] == references[:16]
    assert engine.stats.peak_pages <= 29 and used <= set(range(1, 30))
    assert engine.stats.preempted > 0  # the pool ran out and a sequence was recomputed later
    assert engine.pool.evicted > 0  # released pages still caching a prefix were reused for new tokens
    assert engine.pool.in_use == 0


def test_prefix_pages_are_shared_and_never_written_by_a_sharer(model):
    rng = np.random.default_rng(1)
    prefix = rng.integers(1, 61, 42)
    requests = [(np.concatenate([prefix, rng.integers(1, 61, int(rng.integers(1, 9)))]).astype(np.int32), 6)
                for _ in range(8)]
    engine = Engine(model, slots=5, page_size=4, prefill_chunk=8)  # the shapes of the tests above
    snapshots, holders = {}, []

    def watch(engine):
        for sequence in engine.running:
            if sequence is not None and sequence.shared:
                shared = sequence.pages[: sequence.shared // 4]
                pool = np.asarray(engine.runner.cache[0].k)
                snapshots.setdefault(tuple(shared), pool[shared].copy())
                np.testing.assert_array_equal(pool[shared], snapshots[tuple(shared)])  # no sharer wrote into them
                holders.append(min(engine.pool.references[page] for page in shared))

    engine.on_step = watch
    results = serve(engine, requests)
    assert engine.stats.shared_pages == 7 * 10  # 42 prefix tokens: 10 full pages, reused by the 7 others
    assert snapshots and all(len(pages) == 10 for pages in snapshots)
    assert max(holders) >= 4  # held by several running sequences at once (5 slots)
    assert [results[index].tokens for index in range(8)] == plain_generate(model, requests, Stopping())
    # Released, the prefix's pages stay cached in the table, and a later request takes them back.
    assert engine.pool.in_use == 0 and set(engine.pool.cached) == set(engine.pool.prefix_page.values())
    later = (np.concatenate([prefix, [5, 6, 7]]).astype(np.int32), 6)
    shared = engine.stats.shared_pages
    engine.submit(later[0], max_new_tokens=6)
    assert [result.tokens for result in engine.run()] == plain_generate(model, [later], Stopping())
    assert engine.stats.shared_pages == shared + 10  # not computed again


def test_requests_that_cannot_fit_finish_with_an_error(model):
    engine = Engine(model, slots=2, page_size=4, pages=10)
    engine.submit(np.arange(1, 90), max_new_tokens=20, id="long")
    engine.submit(np.arange(1, 30), max_new_tokens=20, id="pool")
    engine.submit([], max_new_tokens=5, id="empty")
    engine.submit([3, 4], max_new_tokens=2, id="ok")
    results = {r.id: r for r in engine.run()}
    assert "exceeds the longest sequence a slot holds (96 tokens)" in results["long"].error
    assert "more pages than the pool has (9)" in results["pool"].error
    assert results["empty"].error == "the prompt has no tokens"
    assert results["ok"].finish_reason == "length" and len(results["ok"].tokens) == 2
    with pytest.raises(ValueError, match="slots must be an integer >= 1, got 0"):
        Engine(model, slots=0)


def test_a_sampled_request_draws_the_same_tokens_alone_or_among_others(model, requests_and_references):
    requests, _, stopping = requests_and_references
    sampling = Sampling(temperature=0.9, top_k=8, top_p=0.9)
    prompt = requests[3][0]

    def sampled(company):
        engine = Engine(model, slots=5, page_size=4, prefill_chunk=8, stopping=stopping)
        for other, n in company:
            engine.submit(other, max_new_tokens=n)
        engine.submit(prompt, max_new_tokens=12, sampling=sampling, seed=11, id="sampled")
        return next(result.tokens for result in engine.run() if result.id == "sampled")

    alone = sampled([])
    assert alone == sampled(requests[:4])  # its own key stream: the rows around it change nothing
    assert alone != plain_generate(model, [(prompt, 12)], Stopping())[0]  # and it did sample, not take the argmax


def test_sampling_per_row_follows_sample_token():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((5, 30)), jnp.float32)
    settings = [Sampling(), Sampling(temperature=0.7), Sampling(temperature=1.0, top_k=3),
                Sampling(temperature=0.9, top_p=0.5), Sampling(temperature=1.3, top_k=5, top_p=0.8)]
    keys = jax.random.split(jax.random.key(4), 5)
    rows = sample_rows(logits, keys, jnp.array([s.temperature for s in settings]),
                       jnp.array([s.top_k or 0 for s in settings]),
                       jnp.array([1.0 if s.top_p is None else s.top_p for s in settings]))
    for row, sampling in enumerate(settings):  # each row as sample_token draws it alone, with that row's key
        assert int(rows[row]) == int(sample_token(logits[row : row + 1], keys[row], sampling)[0]), sampling


def test_generate_requests_serves_a_jsonl_file(tmp_path, capsys):
    gpt2 = Path(__file__).parent.parent / "data" / "hf" / "gpt2"
    lines = [json.dumps({"prompt": "The sky is", "max_new_tokens": 6, "temperature": 0}),
             json.dumps({"prompt": "The next day", "id": "day", "max_new_tokens": 4, "temperature": 0}),
             "not json", json.dumps({"prompt": "x", "colour": 1}),
             json.dumps({"prompt": "The sky", "max_new_tokens": 500})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["generate", "--model", str(gpt2), "--requests", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--slots", "2", "--page-size", "4"]) == 0
    results = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert set(results) == {1, "day", 3, 4, 5}
    assert results[3]["finish_reason"] == "error" and results[3]["error"].startswith("the line is not JSON") and results[3]["line"] == 3
    assert "unknown field 'colour'" in results[4]["error"]
    assert "exceeds the longest sequence" in results[5]["error"]
    capsys.readouterr()
    assert main(["generate", "--model", str(gpt2), "--prompt", "The sky is", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert "The sky is" + results[1]["text"] == capsys.readouterr().out.strip("\n")  # what generate prints
    assert len(results["day"]["tokens"]) == 4 and results["day"]["finish_reason"] == "length"
    assert main(["generate", "--model", str(gpt2), "--requests", str(tmp_path / "in.jsonl")]) == 2
    assert "--requests needs --output" in capsys.readouterr().err
    drafting = ["generate", "--model", str(gpt2), "--requests", str(tmp_path / "in.jsonl"), "--output",
                str(tmp_path / "drafted.jsonl"), "--slots", "2", "--page-size", "4", "--speculative", "2", "--draft-model"]
    assert main(drafting + [str(gpt2)]) == 0  # the model drafting for itself: the same greedy text
    drafted = {r["id"]: r for r in map(json.loads, (tmp_path / "drafted.jsonl").read_text().splitlines())}
    assert [drafted[key]["tokens"] for key in (1, "day")] == [results[key]["tokens"] for key in (1, "day")]
    assert main(drafting + [str(gpt2.parent / "llama")]) == 2
    assert "does not tokenize text as the model does" in capsys.readouterr().err


def test_every_request_gets_its_full_output_when_nothing_stops_early(model, requests_and_references):
    """Without an end token every request writes all its tokens: a page handed out twice (or the
    trash page handed out) would show in some row's later tokens, which an early stop can hide."""
    requests, _, _ = requests_and_references
    references = plain_generate(model, requests[:16], Stopping())
    results = serve(Engine(model, slots=5, page_size=4, prefill_chunk=8), requests[:16])
    assert [results[index].tokens for index in range(16)] == references


def test_a_shared_prefix_beside_a_long_prompt_on_a_pool_that_preempts(model):
    rng = np.random.default_rng(5)
    prefix = rng.integers(1, 61, 13)
    requests = [(np.concatenate([prefix, rng.integers(1, 61, 3)]).astype(np.int32), 10) for _ in range(3)]
    requests.insert(1, (rng.integers(1, 61, 40).astype(np.int32), 20))  # long and unrelated
    engine = Engine(model, slots=4, page_size=4, pages=24, prefill_chunk=8)
    results = serve(engine, requests)
    assert [results[index].tokens for index in range(4)] == plain_generate(model, requests, Stopping())
    assert engine.stats.preempted > 0 and engine.stats.shared_pages > 0
    assert engine.pool.in_use == 0


def test_a_sampled_request_draws_the_same_with_speculative_decoding_and_drafts_nothing(model, requests_and_references):
    """An accepted draft is a greedy token: a sampled request must not take drafts."""
    requests, _, stopping = requests_and_references
    sampling = Sampling(temperature=0.9, top_k=8, top_p=0.9)
    drawn = {}
    for k in (0, 3):
        engine = Engine(model, slots=2, page_size=4, pages=5 * 24 + 1, prefill_chunk=8, stopping=stopping,
                        speculative=k)
        engine.submit(requests[5][0], max_new_tokens=12, sampling=sampling, seed=3, id="sampled")
        drawn[k] = next(result.tokens for result in engine.run())
        assert engine.stats.drafted == 0
    assert drawn[0] == drawn[3]


def test_top_p_keeps_the_smallest_set_that_reaches_p_exactly_at_the_boundary():
    """Four equal logits: probabilities exactly 1/4 each, so the tokens ranked before the third
    hold exactly p = 1/2. The kept set is the first two; a `<=` would keep three."""
    logits = jnp.zeros((3, 4), jnp.float32)
    temperature, top_k = jnp.ones(3), jnp.zeros(3, jnp.int32)
    top_p = jnp.array([0.5, 0.75, 0.25])
    kept = np.isfinite(np.asarray(filter_logits(logits, temperature, top_k, top_p)))
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    keys = jax.random.split(jax.random.key(0), 64)
    draws = jax.vmap(lambda key: sample_rows(logits, jnp.stack([key] * 3), temperature, top_k, top_p))(keys)
    assert set(np.asarray(draws[:, 0]).tolist()) == {0, 1}  # the engine's rows: the same rule
    assert set(np.asarray(draws[:, 2]).tolist()) == {0}


def test_an_engine_that_cannot_make_progress_says_so_instead_of_looping(model, monkeypatch):
    """A pool whose pages never come back (a reference count never decremented) leaves the
    waiting requests nowhere to go: the engine raises within a bounded number of steps."""
    monkeypatch.setattr(PagePool, "release", lambda self, page: None)
    engine = Engine(model, slots=2, page_size=4, pages=13, prefill_chunk=8)
    for seed in range(6):
        engine.submit(np.random.default_rng(seed).integers(1, 61, 9), max_new_tokens=4)
    with pytest.raises(RuntimeError, match="cannot make progress|cannot hold"):
        for _ in range(200):
            engine.step()


def test_a_requests_file_loses_no_line_and_names_every_bad_one(tmp_path, capsys):
    """Valid lines mixed with every kind of bad line (issue 31): each valid line gets the text it
    gets alone, each bad line one error result with its own id (when it had one) and its line."""
    gpt2 = Path(__file__).parent.parent / "data" / "hf" / "gpt2"
    lines = [
        json.dumps({"prompt": "The sky is", "id": "sky", "max_new_tokens": 5, "temperature": 0}).encode(),
        b"\xff\xfe" + json.dumps({"prompt": "x", "id": "bytes"}).encode(),  # not UTF-8
        b"{not json",
        json.dumps(["The sky is"]).encode(),  # a JSON array
        json.dumps({"id": "b", "max_new_tokens": 3}).encode(),  # no prompt
        json.dumps({"prompt": "x", "id": "hot", "temperature": "hot"}).encode(),  # wrong type
        json.dumps({"prompt": "x", "id": 7, "top_p": 1.5}).encode(),  # out of range
        json.dumps({"prompt": "x", "id": "typo", "max_tokens": 3}).encode(),  # unknown field
        b"",  # blank: not a request
        json.dumps({"prompt": "The next day", "max_new_tokens": 4, "temperature": 0, "top_p": None}).encode(),
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert main(["generate", "--model", str(gpt2), "--requests", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--slots", "2", "--page-size", "4"]) == 0
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    by_line = {result["line"]: result for result in results}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 7, 8, 10] and len(results) == 9
    errors = {line: (by_line[line]["id"], by_line[line]["error"]) for line in by_line if "error" in by_line[line]}
    assert errors == {
        2: (2, "the line is not UTF-8 text (byte 0xff at column 1)"),
        3: (3, "the line is not JSON (Expecting property name enclosed in double quotes at column 2)"),
        4: (4, 'a request is a JSON object with a "prompt", got a JSON list: ["The sky is"]'),
        5: ("b", 'the request has no "prompt" (the text to continue)'),
        6: ("hot", "temperature must be a number, got 'hot'"),
        7: (7, "top_p must be a number > 0 and <= 1, got 1.5"),
        8: ("typo", "unknown field 'max_tokens' (the fields are prompt, id, max_new_tokens, temperature, top_k, "
                    "top_p, seed)"),
    }
    assert by_line[1]["id"] == "sky" and by_line[10]["id"] == 10
    capsys.readouterr()
    for line, prompt, n in ((1, "The sky is", 5), (10, "The next day", 4)):  # what each line gets alone
        assert main(["generate", "--model", str(gpt2), "--prompt", prompt, "--max-new-tokens", str(n),
                     "--temperature", "0"]) == 0
        assert prompt + by_line[line]["text"] == capsys.readouterr().out.strip("\n")


def test_each_steps_deltas_add_up_to_each_result_and_an_abort_frees_its_pages(model, requests_and_references):
    # the delta API a streaming server reads: preemption and speculative rollback included
    requests, references, stopping = requests_and_references
    engine = Engine(model, slots=4, page_size=4, pages=30, prefill_chunk=8, stopping=stopping, speculative=3)
    for prompt, n in requests[:16]:
        engine.submit(prompt, max_new_tokens=n)
    streamed, finished = {i: [] for i in range(16)}, {}
    while engine.busy:
        engine.step()
        check_pages(engine)
        for delta in engine.take_deltas():
            assert delta.id not in finished  # nothing after the end
            streamed[delta.id] += delta.tokens
            if delta.finish_reason is not None:
                finished[delta.id] = delta.finish_reason
    assert [streamed[i] for i in range(16)] == references[:16]
    assert set(finished.values()) <= {"eos", "length"} and len(finished) == 16 and engine.stats.preempted > 0

    for prompt, n in requests[16:22]:  # 4 run, 2 wait
        engine.submit(prompt, max_new_tokens=24)
    engine.step()
    engine.take_deltas()
    running, waiting = engine.running[0].id, engine.waiting[-1].id
    assert engine.abort(running) and engine.abort(waiting) and not engine.abort("no such request")
    assert {delta.id: delta.finish_reason for delta in engine.take_deltas()} == {running: "abort", waiting: "abort"}
    check_pages(engine)
    results = {result.id: result for result in engine.run()}
    assert results[running].finish_reason == results[waiting].finish_reason == "abort"
    assert len(results) == 6 and engine.pool.in_use == 0


def test_a_row_preempted_by_an_earlier_row_of_its_step_takes_no_page(model, requests_and_references):
    # A step gives each row, in turn, pages for its prompt chunk (or its 1 + k tokens) and
    # preempts the latest-admitted other sequence when the pool runs out; a row preempted by an
    # earlier row of the same step must not then be given a page (it would keep it while waiting,
    # and lose it when admitted again). This end token makes that happen in a prefill.
    requests, _, _ = requests_and_references
    engine = Engine(model, slots=4, page_size=4, pages=30, prefill_chunk=8, stopping=Stopping((1,), 0), speculative=3)
    results = serve(engine, requests[:16])  # check_pages after every step: a waiting sequence holds no page
    assert len(results) == 16 and engine.stats.preempted > 0 and engine.pool.in_use == 0


def test_a_call_of_many_rows_runs_fewer_decode_steps(model, requests_and_references):
    # at most 16 tokens a call: 4 rows run up to 4 steps, 2 rows or 1 up to 8; the tokens are those of single steps
    requests, _, _ = requests_and_references

    def run(**options):  # no end token: every request runs to its limit
        engine = Engine(model, slots=4, page_size=4, prefill_chunk=16, **options)
        counts, steps = [], engine.runner.steps

        def recorded_steps(rows, n, *, count, **options):
            counts.append((bucket(len(rows), engine.slots), count))
            return steps(rows, n, count=count, **options)

        engine.runner.steps = recorded_steps
        for index, (prompt, _) in enumerate(requests[:8]):
            engine.submit(prompt, max_new_tokens=8 + 4 * index, id=index)  # they end apart
        return {result.id: result.tokens for result in engine.run()}, counts

    single, _ = run(decode_steps=1)
    several, counts = run(decode_steps=8, decode_tokens=16)
    assert several == single
    assert all(R * count <= 16 for R, count in counts)
    assert (4, 4) in counts and any(R <= 2 and count > 4 for R, count in counts)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_several_decode_steps_per_call_change_no_token(model, requests_and_references, temperature):
    # one slot, nothing waiting: calls of up to 8 steps, each queued behind the last; the tokens
    # are those of single steps
    requests, _, stopping = requests_and_references
    sampling = Sampling(temperature=temperature, top_k=20 if temperature else None)

    def run(decode_steps):
        engine = Engine(model, slots=1, page_size=4, prefill_chunk=16, stopping=stopping, decode_steps=decode_steps)
        calls, steps = [], engine.runner.steps

        def recorded_steps(rows, n, *, after=None, **options):  # each call, and whether it went on from one in flight
            launched = steps(rows, n, after=after, **options)
            calls.append((launched, after is not None))
            return launched

        engine.runner.steps = recorded_steps
        results = []
        for index, (prompt, _) in enumerate(requests[:4]):
            engine.submit(prompt, max_new_tokens=21, sampling=sampling, seed=index)
            results += list(engine.run())
        return [(result.tokens, result.finish_reason) for result in results], engine, calls

    single, _, _ = run(1)
    several, eight_by_eight, calls = run(8)
    assert several == single and eight_by_eight.pool.in_use == 0
    assert any(stopping.ids[0] in tokens for tokens, _ in several)  # (some requests end early)
    assert any(went_on for _, went_on in calls)  # calls were queued behind calls in flight
    # A call runs its count of steps, or up to the first end token; one that went on from a call
    # whose row ended there runs none.
    ran = []
    for (launched, went_on), (before, _) in zip(calls, [(None, False)] + calls[:-1]):
        sampled, taken = launched.read()
        tokens = list(sampled[0, :taken])
        ends = [i for i, token in enumerate(tokens) if token in stopping.ids]
        ended_before = went_on and any(token in stopping.ids for token in before.read()[0][0, : before.read()[1]])
        assert len(tokens) == (0 if ended_before else ends[0] + 1 if ends else launched.count), (tokens, launched.count)
        assert ends in ([], [len(tokens) - 1])
        ran.append(taken)
    # After the prompt's call, a request of g tokens takes ceil((g - 1) / 8) calls that run: as
    # many steps as its limit leaves (never a single step at its end).
    prefills = sum(-(-len(prompt) // 16) for prompt, _ in requests[:4])
    assert eight_by_eight.stats.calls == prefills + sum(-(-(len(tokens) - 1) // 8) for tokens, _ in several) + \
        ran.count(0)
