"""Serving many requests at once: continuous batching over a paged KV cache.

``generate`` runs one batch from start to end: every row reserves a full cache, all rows run
until the longest is done, and a new prompt waits for the whole batch. A serving engine
(vLLM's PagedAttention, Kwon et al. 2023, arXiv 2309.06180; JetStream; transformers'
continuous batching) works one *step* at a time instead:

- the KV memory is a pool of pages (``PagedKVCache``); a sequence is given a page when its
  tokens need one and gives its pages back when it ends, so memory follows the tokens held;
- a fixed number of *slots* (the rows of one compiled step) run together; a waiting request
  takes a slot as soon as one is free and the pool has pages for its prompt;
- a long prompt is prefilled in chunks of ``prefill_chunk`` tokens, read through the pages
  by the same kernel as a decode step, so decoding sequences wait at most one chunk;
- requests whose prompts begin with the same pages share them (``PagePool``: reference
  counts, a table from a prefix's tokens to the page that holds them): the prefix is computed
  once, and a sharer writes only into pages of its own; released, those pages stay cached
  until the pool needs them, so a later request still finds its prefix;
- with ``speculative=k``, every greedy step also proposes up to k draft tokens, by prompt
  lookup (the tokens that followed the last n-gram's previous occurrence in the sequence:
  Saxena 2023) or by a small draft model (Leviathan et al. 2023, arXiv 2211.17192; its own
  pools, the same page tables), and verifies them all in one call of 1 + k tokens; the
  accepted drafts and the model's own next token are kept, and the cache is rolled back
  past the rejected ones (their length is simply not counted).

One engine step is a few compiled calls, each over the sequences it concerns, padded to a
bucket of rows (padding rows write to the trash page and are ignored): a prefill chunk for
the sequences whose prompt is not in yet, and a decode (or draft, then verify) step for the
others. Everything else, which page belongs to whom, who is admitted, who has finished, is
plain Python on the host, between calls. End of sequence is decided by ``Stopping``, the
rule ``generate`` uses.

Shape letters: S rows of a call (at most the slots), T tokens of a call, V vocabulary, N pages a
sequence may hold.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from functools import lru_cache
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxattn.functional.kv_cache import TRASH_PAGE
from jaxattn.lm.generate import Sampling, Stopping

# --------------------------------------------------------------- sampling per row


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One token per row, each row with its own sampling: logits float32 ``[S, V]``, keys
    ``[S]``, temperature float ``[S]`` (0: greedy), top_k int ``[S]`` (0: off), top_p float
    ``[S]`` (1: off) -> int32 ``[S]``. The rules of ``generate.sample_token``, row by row."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)  # [S, V], largest first
    kth = jnp.take_along_axis(ordered, (jnp.clip(top_k, 1, V) - 1)[:, None], axis=-1)  # [S, 1]
    scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = before < top_p[:, None]
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    scaled = jnp.where(keep, scaled, -jnp.inf)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


# ------------------------------------------------------------------ the compiled call


def _forward(graphdef, params, cache, tokens, num_new, page_table, lengths, seeds, counters, temperature, top_k, top_p,
             *, all_positions: bool):
    """One call over every slot: tokens int32 ``[S, T]`` of which ``num_new[s]`` are real,
    written after ``lengths[s]`` tokens through ``page_table [S, N]``. Returns ``(sampled,
    greedy, cache)``: the next token of each row sampled after its last real token ``[S]``;
    with ``all_positions``, the greedy token after every position ``[S, T]`` (to verify
    drafts; else ``None``); and the cache with its pools written."""
    model = nnx.merge(graphdef, params)
    stored = cache
    cache = tuple(layer._replace(page_table=page_table, lengths=lengths) for layer in cache)
    last_index = jnp.maximum(num_new - 1, 0)[:, None]  # [S, 1]
    logits, cache = model(tokens, cache=cache, num_new=num_new, logits_at=None if all_positions else last_index)
    # The tables live on the host: keep the stored ones, so every call sees one cache shape.
    cache = tuple(new._replace(page_table=old.page_table, lengths=old.lengths) for new, old in zip(cache, stored))
    last = jnp.take_along_axis(logits, last_index[..., None], axis=1)[:, 0] if all_positions else logits[:, 0]  # [S, V]
    keys = jax.vmap(lambda seed, counter: jax.random.fold_in(jax.random.key(seed), counter))(seeds, counters)
    last = last.astype(jnp.float32)
    sampled = lax.cond(jnp.any(temperature > 0), sample_rows, lambda logits, *_: jnp.argmax(logits, -1).astype(jnp.int32),
                       last, keys, temperature, top_k, top_p)  # all greedy (the usual case): no sorting
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32) if all_positions else None
    return sampled, greedy, cache


@lru_cache(maxsize=16)
def compiled_forward(graphdef, treedef):
    """``_forward`` compiled for one model structure, taking the parameters as a flat list of
    arrays: an engine step is a few milliseconds on a CPU, and hashing a graphdef and
    flattening an ``nnx.State`` at every call would add about one more."""

    def call(leaves, *args, all_positions: bool):
        return _forward(graphdef, jax.tree.unflatten(treedef, leaves), *args, all_positions=all_positions)

    return jax.jit(call, static_argnames=("all_positions",), donate_argnums=(1,))


def _draft(graphdef, params, cache, tokens, num_new, page_table, lengths, *, k: int):
    """A draft model's k greedy tokens for every row, in one call: tokens int32 ``[S, T]``
    (the ``num_new[s]`` tokens its cache lacks, the last one included) are written after
    ``lengths[s]``, then k - 1 more steps each write the token just drafted. Returns
    ``(drafts [S, k], cache)``."""
    model = nnx.merge(graphdef, params)
    stored = cache
    cache = tuple(layer._replace(page_table=page_table, lengths=lengths) for layer in cache)
    logits, cache = model(tokens, cache=cache, num_new=num_new, logits_at=jnp.maximum(num_new - 1, 0)[:, None])
    drafts = jnp.zeros((tokens.shape[0], k), jnp.int32).at[:, 0].set(jnp.argmax(logits[:, 0], -1).astype(jnp.int32))

    def one_more(i, carry):  # [S, k], cache: write draft i - 1, read draft i
        drafts, cache = carry
        logits, cache = model(lax.dynamic_slice_in_dim(drafts, i - 1, 1, axis=1), cache=cache)  # [S, 1, V]
        return drafts.at[:, i].set(jnp.argmax(logits[:, 0], -1).astype(jnp.int32)), cache

    drafts, cache = lax.fori_loop(1, k, one_more, (drafts, cache))
    cache = tuple(new._replace(page_table=old.page_table, lengths=old.lengths) for new, old in zip(cache, stored))
    return drafts, cache


@lru_cache(maxsize=16)
def compiled_draft(graphdef, treedef):
    """``_draft`` compiled for one draft model structure (as ``compiled_forward``)."""

    def call(leaves, *args, k: int):
        return _draft(graphdef, jax.tree.unflatten(treedef, leaves), *args, k=k)

    return jax.jit(call, static_argnames=("k",), donate_argnums=(1,))


# ------------------------------------------------------------------ pages on the host


class PagePool:
    """Who holds which page: a free list, a reference count per page, and the prefix table
    (the tokens of a prompt up to the end of one of its pages -> the page that holds them).

    Page ``TRASH_PAGE`` is never handed out. When its last holder lets a page go, it returns
    to the free list, unless it holds a prefix of the table: then it stays *cached*, still
    found by the table, so that a later request with the same prefix takes it back instead
    of computing it again (vLLM's automatic prefix caching), until the free list runs out
    and the least recently released cached page is reused (its entry leaves the table).
    """

    def __init__(self, pages: int):
        self.pages = pages
        self.free = deque(range(1, pages))
        self.cached: dict[int, None] = {}  # unreferenced pages that hold a prefix, least recently released first
        self.evicted = 0  # cached pages taken for new tokens
        self.references = np.zeros(pages, np.int64)
        self.prefix_page: dict[tuple, int] = {}
        self.page_prefix: dict[int, tuple] = {}

    @property
    def in_use(self) -> int:
        """Pages some sequence holds (cached ones are not: they can be reused at once)."""
        return self.pages - 1 - len(self.free) - len(self.cached)

    @property
    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def take(self) -> int:
        """A page for new tokens: a free one, else the least recently released cached one."""
        if self.free:
            page = self.free.popleft()
        else:
            page = next(iter(self.cached))
            del self.cached[page]
            del self.prefix_page[self.page_prefix.pop(page)]
            self.evicted += 1
        self.references[page] = 1
        return page

    def share(self, page: int) -> int:
        """One more holder of a page of the prefix table (taken back from the cache if unheld)."""
        self.cached.pop(page, None)
        self.references[page] += 1
        return page

    def release(self, page: int) -> None:
        self.references[page] -= 1
        if self.references[page] == 0:
            if page in self.page_prefix:
                self.cached[page] = None
            else:
                self.free.append(page)

    def register(self, prefix: tuple, page: int) -> None:
        """Page ``page`` holds the last page of ``prefix`` (its whole tokens, computed)."""
        if prefix not in self.prefix_page and page not in self.page_prefix:
            self.prefix_page[prefix] = page
            self.page_prefix[page] = prefix


# ------------------------------------------------------------------ requests


@dataclasses.dataclass
class Result:
    """A finished request: ``tokens`` the continuation (its end token included, as
    ``generate`` keeps it), ``finish_reason`` "eos", "length" or "error" (with ``error``),
    ``first_token_s`` and ``total_s`` seconds from submission."""

    id: object
    tokens: list[int]
    finish_reason: str
    error: str | None = None
    first_token_s: float | None = None
    total_s: float | None = None


@dataclasses.dataclass
class _Sequence:
    id: object
    tokens: list[int]  # the prompt, then every accepted token
    prompt_length: int
    max_new_tokens: int
    sampling: Sampling
    seed: int
    submitted: float
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the pages
    draft_cached: int = 0  # the same for the draft model's keys and values (same pages)
    shared: int = 0  # tokens in pages taken from another sequence's prefix
    first_token_s: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length:]

    @property
    def in_prefill(self) -> bool:
        return self.cached < len(self.tokens) - 1 or not self.generated


class Engine:
    """Continuous batching over a paged KV cache (the module docstring has the design).

    Args:
      model: a ``TransformerLM``.
      slots: how many sequences run together (the rows of the compiled step).
      page_size: tokens per page.
      pages: pages in the pool (default: enough for every slot's longest sequence, plus the
        trash page).
      max_length: the longest sequence (prompt and continuation) a slot can hold (default:
        the model's context).
      prefill_chunk: the most prompt tokens one step prefills per sequence.
      stopping: when a sequence ends (``Stopping.for_tokenizer(tokenizer)``).
      speculative: k, the draft tokens proposed per greedy step (0: off), by prompt lookup
        or by ``draft_model``.
      ngram: the longest n-gram prompt lookup matches.
      draft_model: a small ``TransformerLM`` with the same vocabulary that drafts the k
        tokens (greedily) instead of prompt lookup; its keys and values live in pools of its
        own, read through the same page tables.
      prefix_sharing: share the pages of common prompt prefixes.
      cache_dtype: the pools' entries: the model's dtype (default) or ``"int8"`` (a scale per
        token and head; the draft model's pools too).
    """

    def __init__(self, model, *, slots: int = 8, page_size: int = 16, pages: int | None = None,
                 max_length: int | None = None, prefill_chunk: int = 128, stopping: Stopping = Stopping(),
                 speculative: int = 0, ngram: int = 3, prefix_sharing: bool = True, draft_model=None,
                 cache_dtype=None):
        config = model.config
        max_length = config.max_length if max_length is None else max_length
        for name, value in (("slots", slots), ("page_size", page_size), ("max_length", max_length),
                            ("prefill_chunk", prefill_chunk), ("ngram", ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
            raise ValueError(f"speculative must be an int >= 0, got {speculative!r}")
        if max_length > config.max_length:
            raise ValueError(f"max_length={max_length} exceeds the model's context of {config.max_length}")
        if draft_model is not None:
            draft = draft_model.config
            if speculative < 1:
                raise ValueError("a draft model drafts speculative tokens: give speculative >= 1")
            if draft.vocab_size != config.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft.vocab_size}) is not the model's "
                                 f"({config.vocab_size})")
            if max_length > draft.max_length:
                raise ValueError(f"max_length={max_length} exceeds the draft model's context of {draft.max_length}")
        self.model, self.slots, self.page_size = model, slots, page_size
        self.pages_per_sequence = -(-max_length // page_size)
        self.max_length = max_length
        pages = slots * self.pages_per_sequence + 1 if pages is None else pages
        self.pool = PagePool(pages)
        self.prefill_chunk, self.stopping = prefill_chunk, stopping
        self.speculative, self.ngram, self.prefix_sharing = speculative, ngram, prefix_sharing
        graphdef, params = nnx.split(model)
        leaves, treedef = jax.tree.flatten(params)
        self._forward, self._leaves = compiled_forward(graphdef, treedef), leaves
        self.cache = model.init_paged_cache(slots, pages=pages, page_size=page_size,
                                            pages_per_sequence=self.pages_per_sequence, dtype=cache_dtype)
        self.draft_model = draft_model
        if draft_model is not None:
            graphdef, params = nnx.split(draft_model)
            leaves, treedef = jax.tree.flatten(params)
            self._draft_forward = compiled_forward(graphdef, treedef)
            self._draft, self._draft_leaves = compiled_draft(graphdef, treedef), leaves
            self.draft_cache = draft_model.init_paged_cache(slots, pages=pages, page_size=page_size,
                                                            pages_per_sequence=self.pages_per_sequence, dtype=cache_dtype)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence | None] = [None] * slots
        self.finished: deque[Result] = deque()
        self.next_id = 0
        self.stats = {"steps": 0, "calls": 0, "tokens": 0, "peak_pages": 0, "memory": [], "drafted": 0, "accepted": 0,
                      "shared_pages": 0, "preempted": 0}
        self.on_step: Callable | None = None  # called after every step with the engine (figures, tests)

    # ----------------------------------------------------------------- the interface

    def submit(self, prompt, *, max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0, id=None):
        """Queues a request (a 1-D array of token ids); returns its id. A request that can
        never fit finishes at once with ``finish_reason="error"``."""
        request_id = self.next_id if id is None else id
        self.next_id += 1
        prompt = [int(t) for t in np.asarray(prompt).reshape(-1)]
        sequence = _Sequence(request_id, prompt, len(prompt), int(max_new_tokens), sampling, int(seed), time.perf_counter())
        problem = None
        if not prompt:
            problem = "the prompt has no tokens"
        elif max_new_tokens < 1:
            problem = f"max_new_tokens must be >= 1, got {max_new_tokens}"
        elif len(prompt) + max_new_tokens + self.speculative > self.max_length:
            problem = (f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones exceeds the longest sequence "
                       f"a slot holds ({self.max_length} tokens{', with the speculative tokens' if self.speculative else ''})")
        elif -(-(len(prompt) + max_new_tokens + self.speculative) // self.page_size) > self.pool.pages - 1:
            problem = f"the request needs more pages than the pool has ({self.pool.pages - 1})"
        if problem is not None:
            self.finished.append(Result(request_id, [], "error", problem))
        else:
            self.waiting.append(sequence)
        return request_id

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.running)

    def step(self) -> list[Result]:
        """Admits what fits, runs one prefill chunk and one decode step; returns the requests
        that finished (errors included)."""
        self._admit()
        if any(s is not None and s.in_prefill for s in self.running):
            self._prefill()
        if any(s is not None and not s.in_prefill for s in self.running):
            self._decode()
        self.stats["steps"] += 1
        held = self._tokens_held()
        self.stats["memory"].append((self.pool.in_use * self.page_size, held))
        self.stats["peak_pages"] = max(self.stats["peak_pages"], self.pool.in_use)
        if self.on_step is not None:
            self.on_step(self)
        done = list(self.finished)
        self.finished.clear()
        return done

    def run(self) -> Iterator[Result]:
        """Steps until every submitted request has finished, yielding each as it finishes."""
        yield from self.finished_now()
        while self.busy:
            yield from self.step()

    def finished_now(self) -> list[Result]:
        done = list(self.finished)
        self.finished.clear()
        return done

    # ----------------------------------------------------------------- admission

    def _prefix_keys(self, tokens: list[int]) -> list[tuple]:
        """The prefixes that end at each full page of a prompt, leaving at least its last token
        to compute (its logits give the first new token)."""
        full = (len(tokens) - 1) // self.page_size
        return [tuple(tokens[: (i + 1) * self.page_size]) for i in range(full)]

    def _pending_prefixes(self) -> set:
        pending = set()
        for sequence in self.running:
            if sequence is not None and sequence.in_prefill:
                keys = self._prefix_keys(sequence.tokens[: sequence.prompt_length])
                pending.update(keys[sequence.cached // self.page_size:])
        return pending

    def _admit(self) -> None:
        pending = self._pending_prefixes() if self.prefix_sharing else set()
        deferred = deque()
        while self.waiting and None in self.running:
            sequence = self.waiting.popleft()
            keys = self._prefix_keys(sequence.tokens) if self.prefix_sharing else []
            matched = 0
            while matched < len(keys) and keys[matched] in self.pool.prefix_page:
                matched += 1
            if matched < len(keys) and keys[matched] in pending:  # another sequence is computing it: wait for it
                deferred.append(sequence)
                continue
            needed = -(-(len(sequence.tokens) + 1) // self.page_size) - matched
            cached = sum(self.pool.references[self.pool.prefix_page[key]] == 0 for key in keys[:matched])
            if needed + cached > self.pool.available:  # taking back a cached page makes it unavailable
                deferred.append(sequence)
                break  # first come, first served: nothing behind it jumps the queue for pages
            sequence.slot = self.running.index(None)
            sequence.pages = [self.pool.share(self.pool.prefix_page[key]) for key in keys[:matched]]
            sequence.cached = sequence.draft_cached = sequence.shared = matched * self.page_size  # both models' pages
            self.stats["shared_pages"] += matched
            self.running[sequence.slot] = sequence
            pending.update(keys[matched:])
        self.waiting.extendleft(reversed(deferred))

    def _ensure_pages(self, sequence: _Sequence, tokens: int) -> bool:
        """Gives ``sequence`` pages for ``tokens`` tokens; False when the pool runs out."""
        while len(sequence.pages) * self.page_size < tokens:
            if not self.pool.available:
                return False
            sequence.pages.append(self.pool.take())
        return True

    def _preempt(self, keep: _Sequence) -> bool:
        """Frees the pages of the latest-admitted other sequence and queues it again (to be
        prefilled anew, its continuation so far part of its prompt); False if none."""
        victims = [s for s in self.running if s is not None and s is not keep]
        if not victims:
            return False
        victim = max(victims, key=lambda s: s.submitted)
        self._release(victim)
        self.running[victim.slot] = None
        victim.cached, victim.draft_cached, victim.shared, victim.slot = 0, 0, 0, -1
        self.waiting.appendleft(victim)
        self.stats["preempted"] += 1
        return True

    def _release(self, sequence: _Sequence) -> None:
        for page in reversed(sequence.pages):  # the deepest pages of a prefix are reused first, its start last
            self.pool.release(page)
        sequence.pages = []

    # ----------------------------------------------------------------- the calls

    def _bucket(self, n: int, largest: int, smallest: int = 1) -> int:
        """The compiled size for ``n`` rows or tokens: the next power of two (at least
        ``smallest``), at most ``largest``. A few shapes, each compiled once, so a call over
        two sequences does not pay for every slot, nor a 5-token chunk for a full one."""
        size = smallest
        while size < n:
            size *= 2
        return min(size, largest)

    def warm_up(self) -> int:
        """Compiles every shape a step may call (each bucket of rows with each bucket of
        tokens: prefill chunks, decode, verify, draft), as a server does before it takes
        requests, so that no request waits for a compiler. Every row is padding: nothing is
        written but the trash page. Returns the number of shapes."""
        rows = []
        size = 1
        while size < self.slots:
            rows.append(size)
            size *= 2
        rows.append(self.slots)
        chunks = sorted({self._bucket(n, self.prefill_chunk, smallest=16) for n in range(1, self.prefill_chunk + 1)})
        verify = sorted({self._bucket(n, 1 + self.speculative, smallest=2) for n in range(2, 2 + self.speculative)})
        shapes = 0
        calls = [(T, False) for T in chunks + [1]] + [(T, True) for T in verify]  # (tokens, all positions)
        for R in rows:
            for T, all_positions in calls:
                written, sampling = self._arrays([], T, R=R)
                _, _, self.cache = self._forward(self._leaves, self.cache, *written, *sampling,
                                                 all_positions=all_positions)
                shapes += 1
            if self.draft_model is not None:
                for T in chunks:
                    written, sampling = self._arrays([], T, R=R)
                    _, _, self.draft_cache = self._draft_forward(self._draft_leaves, self.draft_cache, *written,
                                                                 *sampling, all_positions=False)
                written, _ = self._arrays([], 2, R=R)
                _, self.draft_cache = self._draft(self._draft_leaves, self.draft_cache, *written, k=self.speculative)
                shapes += len(chunks) + 1
        jax.block_until_ready(self.cache)
        return shapes

    def _arrays(self, rows: list[tuple[_Sequence, list[int]]], T: int, *, draft: bool = False, R: int | None = None):
        """The arrays of one call over ``rows`` (each a sequence and the tokens it adds now,
        written after the tokens its cache holds: ``cached``, or ``draft_cached`` for the draft
        model), padded to a bucket of rows (or to ``R``) whose table is all trash page: tokens
        ``[R, T]``, num_new ``[R]``, page table ``[R, N]``, lengths ``[R]``, and the sampling of
        each row."""
        R, N = self._bucket(len(rows), self.slots) if R is None else R, self.pages_per_sequence
        tokens, num_new = np.zeros((R, T), np.int32), np.zeros(R, np.int32)
        table, lengths = np.full((R, N), TRASH_PAGE, np.int32), np.zeros(R, np.int32)
        seeds, counters = np.zeros(R, np.int32), np.zeros(R, np.int32)
        temperature, top_k, top_p = np.zeros(R, np.float32), np.zeros(R, np.int32), np.ones(R, np.float32)
        for row, (sequence, new) in enumerate(rows):
            tokens[row, : len(new)], num_new[row] = new, len(new)
            table[row, : len(sequence.pages)] = sequence.pages
            lengths[row] = sequence.draft_cached if draft else sequence.cached
            seeds[row], counters[row] = sequence.seed, len(sequence.generated)
            sampling = sequence.sampling
            temperature[row] = sampling.temperature
            top_k[row] = sampling.top_k or 0
            top_p[row] = 1.0 if sampling.top_p is None else sampling.top_p
        return (tokens, num_new, table, lengths), (seeds, counters, temperature, top_k, top_p)

    def _call(self, rows: list[tuple[_Sequence, list[int]]], T: int, *, all_positions: bool = False):
        """Runs the model once over ``rows`` (see ``_arrays``); the pools are kept. Returns
        ``(sampled [R], greedy [R, T] or None)`` as NumPy, row i for ``rows[i]``."""
        written, sampling = self._arrays(rows, T)
        sampled, greedy, self.cache = self._forward(self._leaves, self.cache, *written, *sampling,
                                                    all_positions=all_positions)
        self.stats["calls"] += 1
        return np.asarray(sampled), None if greedy is None else np.asarray(greedy)

    def _prefill(self) -> None:
        chunks = {}
        for sequence in list(self.running):
            if sequence is None or not sequence.in_prefill:
                continue
            todo = sequence.tokens[sequence.cached : sequence.cached + self.prefill_chunk]
            while not self._ensure_pages(sequence, sequence.cached + len(todo)):
                if not self._preempt(sequence):
                    raise RuntimeError("the page pool cannot hold one sequence's prompt")
            chunks[sequence.slot] = (sequence, todo)
        rows = [(sequence, todo) for sequence, todo in chunks.values() if sequence.slot >= 0]  # not preempted since
        if not rows:
            return
        T = self._bucket(max(len(todo) for _, todo in rows), self.prefill_chunk, smallest=16)
        sampled, _ = self._call(rows, T)
        if self.draft_model is not None:  # the draft model reads the same prompt into its own pools
            written, sampling = self._arrays(rows, T, draft=True)
            _, _, self.draft_cache = self._draft_forward(self._draft_leaves, self.draft_cache, *written, *sampling,
                                                         all_positions=False)
            self.stats["calls"] += 1
        for row, (sequence, todo) in enumerate(rows):
            sequence.cached += len(todo)
            sequence.draft_cached = sequence.cached
            self._register_prefix(sequence)
            if sequence.cached == len(sequence.tokens):  # the prompt is in: its last logits give a token
                self._accept(sequence, [int(sampled[row])])

    def _register_prefix(self, sequence: _Sequence) -> None:
        if not self.prefix_sharing:
            return
        keys = self._prefix_keys(sequence.tokens[: sequence.prompt_length])
        for index in range(min(len(keys), sequence.cached // self.page_size)):
            self.pool.register(keys[index], sequence.pages[index])

    def _room(self, sequence: _Sequence) -> int:
        """How many tokens ``sequence`` may draft this step: k, fewer near its limit, none
        when it samples."""
        if not self.speculative or sequence.sampling.temperature > 0:
            return 0
        return max(0, min(self.speculative, sequence.max_new_tokens - len(sequence.generated) - 1))

    def _lookup_drafts(self, sequence: _Sequence) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the
        sequence's last n-gram (n = ngram .. 1), as many as its room."""
        tokens, room = sequence.tokens, self._room(sequence)
        if room < 1:
            return []
        for n in range(min(self.ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    # Copy what followed, reading on into the copy itself when it reaches the end
                    # (as LZ77 does): a repeat of period p drafts ``room`` tokens, not p - n.
                    draft = []
                    for j in range(start + n, start + n + room):
                        draft.append(tokens[j] if j < len(tokens) else draft[j - len(tokens)])
                    return draft
        return []

    def _model_drafts(self, decoding: list[_Sequence]) -> dict[int, list[int]]:
        """The draft model's greedy drafts, ``{slot: tokens}``, for every sequence with room:
        one call writes the tokens its pools lack (one, or two when every draft was accepted)
        and drafts k tokens; its pools then hold all but the last draft."""
        drafting = [sequence for sequence in decoding if self._room(sequence) > 0]
        if not drafting:
            return {}
        rows = [(sequence, sequence.tokens[sequence.draft_cached :]) for sequence in drafting]
        written, _ = self._arrays(rows, 2, draft=True)
        drafts, self.draft_cache = self._draft(self._draft_leaves, self.draft_cache, *written, k=self.speculative)
        self.stats["calls"] += 1
        drafts = np.asarray(drafts)
        for sequence in drafting:
            sequence.draft_cached = len(sequence.tokens) + self.speculative - 1
        return {sequence.slot: drafts[row, : self._room(sequence)].tolist() for row, sequence in enumerate(drafting)}

    def _decode(self) -> None:
        for sequence in list(self.running):  # pages first: the draft model writes into them too
            if sequence is None or sequence.in_prefill:
                continue
            while not self._ensure_pages(sequence, sequence.cached + 1 + self._room(sequence)):
                if not self._preempt(sequence):
                    raise RuntimeError("the page pool cannot hold one sequence")
        decoding = [sequence for sequence in self.running if sequence is not None and not sequence.in_prefill]
        if not decoding:
            return
        if self.draft_model is not None:
            drafts = self._model_drafts(decoding)
        else:
            drafts = {sequence.slot: self._lookup_drafts(sequence) for sequence in decoding}
        rows = [(sequence, [sequence.tokens[-1]] + drafts.get(sequence.slot, [])) for sequence in decoding]
        longest = max(len(new) for _, new in rows)
        if longest == 1:  # nothing drafted this step: a plain decode step
            sampled, _ = self._call(rows, 1)
            for row, (sequence, _) in enumerate(rows):
                sequence.cached += 1
                self._accept(sequence, [int(sampled[row])])
            return
        T = self._bucket(longest, 1 + self.speculative, smallest=2)
        sampled, greedy = self._call(rows, T, all_positions=True)  # [R], [R, T]
        for row, (sequence, new) in enumerate(rows):
            proposed = new[1:]  # a sampled row proposes nothing: its token is the sampled one
            accepted = 0
            while accepted < len(proposed) and proposed[accepted] == greedy[row, accepted]:
                accepted += 1
            self.stats["drafted"] += len(proposed)
            self.stats["accepted"] += accepted
            # The last token and the accepted drafts stay; the rest is rolled back (not counted).
            sequence.cached += 1 + accepted
            sequence.draft_cached = min(sequence.draft_cached, sequence.cached)
            next_token = sampled[row] if sequence.sampling.temperature > 0 else greedy[row, accepted]
            self._accept(sequence, proposed[:accepted] + [int(next_token)])

    def _accept(self, sequence: _Sequence, new_tokens: list[int]) -> None:
        """Appends tokens until the end token or the limit; finishes the sequence there."""
        if sequence.first_token_s is None:
            sequence.first_token_s = time.perf_counter() - sequence.submitted
        for token in new_tokens:
            sequence.tokens.append(token)
            self.stats["tokens"] += 1
            if self.stopping.ids and token in self.stopping.ids:
                return self._finish(sequence, "eos")
            if len(sequence.generated) >= sequence.max_new_tokens:
                return self._finish(sequence, "length")

    def _finish(self, sequence: _Sequence, reason: str) -> None:
        self._release(sequence)
        self.running[sequence.slot] = None
        self.finished.append(Result(sequence.id, sequence.generated, reason, None, sequence.first_token_s,
                                    time.perf_counter() - sequence.submitted))

    def _tokens_held(self) -> int:
        """Tokens the pages in use hold, each shared page counted once."""
        filled = {}
        for sequence in self.running:
            if sequence is None:
                continue
            for index, page in enumerate(sequence.pages):
                filled[page] = max(filled.get(page, 0), min(self.page_size, max(0, sequence.cached - index * self.page_size)))
        return sum(filled.values())
