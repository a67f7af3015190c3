"""The compiled calls of the serving engine, and the arrays they take.

One call runs the model over some sequences of the engine at once: each row is a sequence
and the tokens it adds now, written after the tokens its pages hold, read through its page
table. Rows are padded to a bucket (a power of two, at most the slots) and tokens to a
bucket too, so that a few shapes, each compiled once, serve every step; a padding row's
table is all trash page, so it writes nowhere that matters. The parameters are passed as a
flat list of arrays: an engine step is a few milliseconds on a CPU, and hashing a graphdef
and flattening an ``nnx.State`` at every call would add about one more.

Shape letters: R rows of a call (at most the slots), T tokens of a call, V vocabulary, N pages
a sequence may hold, k draft tokens.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxattn.functional.kv_cache import TRASH_PAGE
from jaxattn.lm.generate import Stopping
from jaxattn.lm.sampling import sample_rows


def _with_tables(cache, page_table, lengths):
    return tuple(layer._replace(page_table=page_table, lengths=lengths) for layer in cache)


def _tables_of(cache, stored):
    """The tables live on the host: keep the stored ones, so every call sees one cache shape."""
    return tuple(new._replace(page_table=old.page_table, lengths=old.lengths) for new, old in zip(cache, stored))


def model_call(graphdef, params, cache, tokens, num_new, page_table, lengths, seeds, counters, temperature, top_k, top_p,
               *, all_positions: bool):
    """One call over R rows: tokens int32 ``[R, T]`` of which ``num_new[r]`` are real, written
    after ``lengths[r]`` tokens through ``page_table [R, N]``. Returns ``(sampled, greedy,
    cache)``: the next token of each row sampled after its last real token ``[R]`` (the key of
    row r is its seed folded with ``counters[r]``, the tokens it has generated); with
    ``all_positions``, the greedy token after every position ``[R, T]`` (to verify drafts;
    else ``None``); and the cache with its pools written."""
    model = nnx.merge(graphdef, params)
    last_index = jnp.maximum(num_new - 1, 0)[:, None]  # [R, 1]
    logits, new_cache = model(tokens, cache=_with_tables(cache, page_table, lengths), num_new=num_new,
                              logits_at=None if all_positions else last_index)
    last = jnp.take_along_axis(logits, last_index[..., None], axis=1)[:, 0] if all_positions else logits[:, 0]  # [R, V]
    last = last.astype(jnp.float32)

    def sample(last, seeds, counters, temperature, top_k, top_p):
        keys = jax.vmap(lambda seed, counter: jax.random.fold_in(jax.random.key(seed), counter))(seeds, counters)
        return sample_rows(last, keys, temperature, top_k, top_p)

    sampled = lax.cond(jnp.any(temperature > 0), sample, lambda logits, *_: jnp.argmax(logits, -1).astype(jnp.int32),
                       last, seeds, counters, temperature, top_k, top_p)  # all greedy (the usual case): no keys, no sorting
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32) if all_positions else None
    return sampled, greedy, _tables_of(new_cache, cache)


def draft_call(graphdef, params, cache, tokens, num_new, page_table, lengths, *, k: int):
    """A draft model's k greedy tokens for every row, in one call: tokens int32 ``[R, T]`` (the
    ``num_new[r]`` tokens its cache lacks, the last one included) are written after
    ``lengths[r]``, then k - 1 more steps each write the token just drafted. Returns
    ``(drafts [R, k], cache)``."""
    model = nnx.merge(graphdef, params)
    logits, new_cache = model(tokens, cache=_with_tables(cache, page_table, lengths), num_new=num_new,
                              logits_at=jnp.maximum(num_new - 1, 0)[:, None])
    drafts = jnp.zeros((tokens.shape[0], k), jnp.int32).at[:, 0].set(jnp.argmax(logits[:, 0], -1).astype(jnp.int32))

    def one_more(i, carry):  # [R, k], cache: write draft i - 1, read draft i
        drafts, cache = carry
        logits, cache = model(lax.dynamic_slice_in_dim(drafts, i - 1, 1, axis=1), cache=cache)  # [R, 1, V]
        return drafts.at[:, i].set(jnp.argmax(logits[:, 0], -1).astype(jnp.int32)), cache

    drafts, new_cache = lax.fori_loop(1, k, one_more, (drafts, new_cache))
    return drafts, _tables_of(new_cache, cache)


def decode_steps(graphdef, params, cache, tokens, num_new, page_table, lengths, seeds, counters, temperature, top_k,
                 top_p, count, stopping, ended, *, n: int):
    """At most n decode steps in one call: ``model_call`` ``count`` (<= n) times, each writing
    the token the last one sampled (row r's key folded with ``counters[r] + i`` at step i, as
    separate calls would), and no more once every row has ended: ``ended [R]`` says which have
    (padding rows, or rows that ended in the call before), and a row ends at an end token of
    ``stopping``. tokens ``[R, 1]``; the page table must already hold ``lengths + count``
    tokens. Returns ``(sampled [R, n], taken, ended [R], last [R, 1], cache)``: the first
    ``taken`` columns are the steps run; ``ended`` and the last token sampled are what a call
    that goes on from this one starts from."""

    def running(carry):
        i, _, _, _, ended = carry
        return (i < count) & ~jnp.all(ended)

    def step(carry):
        i, token, cache, out, ended = carry
        sampled, _, cache = model_call(graphdef, params, cache, token, num_new, page_table, lengths + i, seeds,
                                       counters + i, temperature, top_k, top_p, all_positions=False)
        return i + 1, sampled[:, None], cache, out.at[:, i].set(sampled), ended | stopping.ends(sampled)

    out = jnp.zeros((tokens.shape[0], n), jnp.int32)
    taken, last, cache, out, ended = lax.while_loop(running, step, (jnp.int32(0), tokens, cache, out, ended))
    return out, taken, ended, last, cache


# XLA's CPU compiler splits some fused loops of a program over its threads (the pass
# "cpu-parallel-task-assigner"), judging each op alone. In a call of one token every op is small
# (one row's block of keys is 128 KB) and the split costs more than it saves; from 8 rows on it
# pays. `python -m benchmarks.serve_calls` times both programs: 8 decode steps in one call, 300
# tokens held a row, ms with the split / without, four runs: 1 row 9.07 / 8.19, 9.27 / 8.24,
# 8.81 / 8.11, 8.81 / 7.89; 2 rows 12.25 / 12.48, 12.18 / 12.60, 12.13 / 11.97, 12.42 / 12.76;
# 4 rows 17.52 / 18.02, 18.64 / 18.90, 17.18 / 17.23, 18.27 / 18.91; 8 rows 29-32 / 33-37; 16 rows
# 52-60 / 69-75. So on a CPU a call of this many tokens (rows x tokens a row) is compiled without
# the split.
UNSPLIT_MAX_TOKENS = 1
UNSPLIT = {"xla_disable_hlo_passes": "cpu-parallel-task-assigner"}


def _options(split: bool):
    return None if split or jax.default_backend() != "cpu" else UNSPLIT


@lru_cache(maxsize=32)
def compiled_model_call(graphdef, treedef, split: bool = True):
    """``model_call`` compiled for one model structure, taking the parameters as a flat list
    (``split=False``: without XLA's split of loops over threads, for calls of a few tokens)."""

    def call(leaves, *args, all_positions: bool):
        return model_call(graphdef, jax.tree.unflatten(treedef, leaves), *args, all_positions=all_positions)

    return jax.jit(call, static_argnames=("all_positions",), donate_argnums=(1,), compiler_options=_options(split))


@lru_cache(maxsize=32)
def compiled_decode_steps(graphdef, treedef, split: bool = True):
    """``decode_steps`` compiled for one model structure (as ``compiled_model_call``)."""

    def call(leaves, *args, n: int):
        return decode_steps(graphdef, jax.tree.unflatten(treedef, leaves), *args, n=n)

    return jax.jit(call, static_argnames=("n",), donate_argnums=(1,), compiler_options=_options(split))


@lru_cache(maxsize=16)
def compiled_draft_call(graphdef, treedef):
    """``draft_call`` compiled for one draft model structure (as ``compiled_model_call``)."""

    def call(leaves, *args, k: int):
        return draft_call(graphdef, jax.tree.unflatten(treedef, leaves), *args, k=k)

    return jax.jit(call, static_argnames=("k",), donate_argnums=(1,))


class StepsInFlight(NamedTuple):
    """A call of several decode steps on its way (``ModelRunner.steps``): the steps it may run,
    and its outputs, not yet read: ``sampled [R, n]``, ``taken``, ``ended [R]``, ``last [R, 1]``."""

    count: int
    sampled: jax.Array
    taken: jax.Array
    ended: jax.Array
    last: jax.Array

    def read(self) -> tuple[np.ndarray, int]:
        """Waits for the call: ``(sampled [R, n], taken)`` as NumPy; the first ``taken`` columns ran."""
        sampled, taken = jax.device_get((self.sampled, self.taken))  # one wait for both
        return sampled, int(taken)


def bucket(n: int, largest: int, smallest: int = 1) -> int:
    """The compiled size for ``n`` rows or tokens: the next power of two (at least
    ``smallest``), at most ``largest``. A few shapes, each compiled once, so a call over
    two sequences does not pay for every slot, nor a 5-token chunk for a full one."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


class ModelRunner:
    """One model (and its pools) behind the engine: the arrays of a call, and the call.

    ``rows`` of a call are ``(sequence, new tokens)`` pairs; a sequence gives its ``pages``,
    its ``seed``, its ``sampling``, how many tokens it has ``generated``, and how many its pages
    hold for this model (``length_of(sequence)``). ``calls`` counts the calls made.
    """

    def __init__(self, model, *, slots: int, pages: int, page_size: int, pages_per_sequence: int, cache_dtype=None):
        graphdef, params = nnx.split(model)
        leaves, treedef = jax.tree.flatten(params)
        self.model, self.slots, self.pages_per_sequence = model, slots, pages_per_sequence
        self.leaves = leaves
        # by whether a call is split over threads: {True: compiled, False: compiled unsplit}
        self.forward = {split: compiled_model_call(graphdef, treedef, split) for split in (True, False)}
        self.forward_steps = {split: compiled_decode_steps(graphdef, treedef, split) for split in (True, False)}
        self.draft_forward = compiled_draft_call(graphdef, treedef)
        self.cache = model.init_paged_cache(slots, pages=pages, page_size=page_size,
                                            pages_per_sequence=pages_per_sequence, dtype=cache_dtype)
        self.calls = 0

    def arrays(self, rows, T: int, *, lengths_of, ahead: int = 0, R: int | None = None):
        """The arrays of one call over ``rows``, padded to a bucket of rows (or to ``R``) whose
        table is all trash page: ``(tokens [R, T], num_new [R], page table [R, N], lengths [R])``
        and the sampling of each row ``(seeds, counters, temperature, top_k, top_p)``; with
        ``ahead``, as they will be once a call in flight has added that many tokens to each row."""
        R, N = bucket(len(rows), self.slots) if R is None else R, self.pages_per_sequence
        tokens, num_new = np.zeros((R, T), np.int32), np.zeros(R, np.int32)
        table, lengths = np.full((R, N), TRASH_PAGE, np.int32), np.zeros(R, np.int32)
        seeds, counters = np.zeros(R, np.int32), np.zeros(R, np.int32)
        temperature, top_k, top_p = np.zeros(R, np.float32), np.zeros(R, np.int32), np.ones(R, np.float32)
        for row, (sequence, new) in enumerate(rows):
            tokens[row, : len(new)], num_new[row] = new, len(new)
            table[row, : len(sequence.pages)] = sequence.pages
            lengths[row] = lengths_of(sequence) + ahead
            seeds[row], counters[row] = sequence.seed, len(sequence.generated) + ahead
            sampling = sequence.sampling
            temperature[row] = sampling.temperature
            top_k[row] = sampling.top_k or 0
            top_p[row] = 1.0 if sampling.top_p is None else sampling.top_p
        return (tokens, num_new, table, lengths), (seeds, counters, temperature, top_k, top_p)

    def call(self, rows, T: int, *, lengths_of, all_positions: bool = False, R: int | None = None):
        """Runs the model once over ``rows``; the pools are kept. Returns ``(sampled [R],
        greedy [R, T] or None)`` as NumPy, row i for ``rows[i]``."""
        written, sampling = self.arrays(rows, T, lengths_of=lengths_of, R=R)
        forward = self.forward[written[0].size > UNSPLIT_MAX_TOKENS]  # tokens [R, T]
        sampled, greedy, self.cache = forward(self.leaves, self.cache, *written, *sampling, all_positions=all_positions)
        self.calls += 1
        return np.asarray(sampled), None if greedy is None else np.asarray(greedy)

    def steps(self, rows, n: int, *, count: int, stopping: Stopping, lengths_of, after: StepsInFlight | None = None,
              R: int | None = None) -> StepsInFlight:
        """Starts up to n decode steps over ``rows`` (one new token each) in one call and
        returns without waiting for it: ``count`` steps, fewer once every row has sampled an
        end token of ``stopping``. ``after``: a call still in flight over the same rows; this
        one goes on from its last tokens and ended rows, with the arrays as they will be once
        it has run its ``count`` steps (if it stops sooner, every row has ended and this one
        runs none), so that it can be queued before that one's tokens are read."""
        ahead = 0 if after is None else after.count
        written, sampling = self.arrays(rows, 1, lengths_of=lengths_of, ahead=ahead, R=R)
        tokens, num_new, table, lengths = written
        tokens, ended = (tokens, num_new == 0) if after is None else (after.last, after.ended)
        forward = self.forward_steps[tokens.size > UNSPLIT_MAX_TOKENS]  # tokens [R, 1]
        sampled, taken, ended, last, self.cache = forward(self.leaves, self.cache, tokens, num_new, table, lengths,
                                                          *sampling, np.int32(count), stopping, ended, n=n)
        self.calls += 1
        return StepsInFlight(count, sampled, taken, ended, last)

    def draft(self, rows, k: int, *, lengths_of, R: int | None = None) -> np.ndarray:
        """k greedy tokens after each row's new tokens (at most 2 a row): ``[R, k]`` as NumPy."""
        written, _ = self.arrays(rows, 2, lengths_of=lengths_of, R=R)
        drafts, self.cache = self.draft_forward(self.leaves, self.cache, *written, k=k)
        self.calls += 1
        return np.asarray(drafts)
