"""Serving many requests at once: continuous batching over a paged KV cache.

``generate`` runs one batch from start to end: every row reserves a full cache, all rows run
until the longest is done, and a new prompt waits for the whole batch. A serving engine
(vLLM's PagedAttention, Kwon et al. 2023, arXiv 2309.06180; JetStream; transformers'
continuous batching) works one *step* at a time instead:

- the KV memory is a pool of pages (``PagedKVCache``); a sequence is given a page when its
  tokens need one and gives its pages back when it ends, so memory follows the tokens held
  (``PagePool``, pages.py);
- a fixed number of *slots* (the rows of one compiled step) run together; a waiting request
  takes a slot as soon as one is free and the pool has pages for its prompt; when the pool
  runs out mid-way, the latest-admitted other sequence is *preempted*: its pages are freed
  and it waits again, to be prefilled anew;
- a long prompt is prefilled in chunks of ``prefill_chunk`` tokens (smaller ones when many
  prompts are prefilled at once: a call computes at most ``prefill_tokens``), read through the
  pages by the same kernel as a decode step, so decoding sequences wait at most one chunk;
- requests whose prompts begin with the same pages share them (reference counts and a
  prefix table): the prefix is computed once, and a sharer writes only into pages of its
  own; released, those pages stay cached until the pool needs them;
- with ``speculative=k``, every greedy step also proposes up to k draft tokens (drafts.py:
  prompt lookup or a draft model) and verifies them all in one call of 1 + k tokens; the
  accepted drafts and the model's own next token are kept, and the cache is rolled back
  past the rejected ones (their length is simply not counted).

One engine step is a few compiled calls (runner.py), each over the sequences it concerns:
a prefill chunk for the sequences whose prompt is not in yet, and a decode (or draft, then
verify) step for the others. Everything else, which page belongs to whom, who is admitted,
who has finished, is plain Python on the host, between calls. End of sequence is decided by
``Stopping``, the rule ``generate`` uses; sampling by ``sample_rows``, ``generate``'s rule.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Callable, Iterator

import jax
import numpy as np

from jaxattn.functional.checks import check_int
from jaxattn.lm.generate import Stopping
from jaxattn.lm.sampling import Sampling
from jaxattn.serve.drafts import DraftModel, PromptLookup
from jaxattn.serve.pages import PagePool, prefix_keys
from jaxattn.serve.runner import ModelRunner, StepsInFlight, bucket


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
class Delta:
    """What one step did to one request: the tokens it added (``tokens``), and
    ``finish_reason`` when the request ended in that step ("eos", "length", "error" or
    "abort"; ``None`` while it runs). A streaming server sends these as they come."""

    id: object
    tokens: list[int]
    finish_reason: str | None = None


@dataclasses.dataclass
class EngineStats:
    """What an engine has done so far.

    ``steps`` engine steps; ``calls`` compiled calls (prefill, decode, verify, draft);
    ``tokens`` tokens generated; ``peak_pages`` the most pages in use after a step;
    ``memory`` after every step, ``(pages in use x page size, tokens those pages hold)``;
    ``drafted`` and ``accepted`` speculative tokens; ``shared_pages`` prefix pages taken from
    the table instead of computed; ``preempted`` sequences sent back to wait when pages ran out.
    """

    steps: int = 0
    calls: int = 0
    tokens: int = 0
    peak_pages: int = 0
    memory: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    shared_pages: int = 0
    preempted: int = 0


@dataclasses.dataclass
class Sequence:
    """A request inside the engine: its tokens so far and the pages that hold them."""

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


def _same(sequences: list[Sequence], others: list[Sequence]) -> bool:
    return len(sequences) == len(others) and all(a is b for a, b in zip(sequences, others))


def _cached_length(sequence: Sequence) -> int:
    return sequence.cached


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
      prefill_chunk: the most prompt tokens one step prefills per sequence (a chunk is padded to
        a power of two). 256: on a CPU, benchmarks/serve.py's 8 prompts of one slot prefill in
        0.13-0.14 s in chunks of 256, 0.17 s in chunks of 128 or 512.
      prefill_tokens: the most tokens one prefill call computes, padding included (its bucket
        of rows x its chunk): with many rows prefilling at once each row's chunk is halved
        (not below 16) until the call fits, so that a request arriving meanwhile, and the rows
        decoding, wait for no more. 8192: at 64 slots, chunks of 256 (16k tokens a call) put
        the HTTP trace's median first token at 2.25 s, chunks of 128 at 1.62 s.
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
      decode_steps: n, the most decode steps one call may run while no request waits and none
        is in its prefill (their pages reserved ahead; without speculative decoding): a step
        returns to Python once per n tokens instead of every token. A call runs fewer when a
        request is nearer its limit, and stops once every row has written its end token. The
        next such call is queued before this one's tokens are read, so a request that arrives
        waits for at most two calls before its prefill. The tokens are those of single steps.
        1: one step per call.
      decode_tokens: the most tokens such a call decodes (its bucket of rows x its steps): a
        call of many rows runs fewer steps, so that it holds an arriving request no longer, and
        a streamed chunk carries fewer tokens (up to 16 rows: 8 steps; 32 rows: 4; 64 rows: 2).
    """

    def __init__(self, model, *, slots: int = 8, page_size: int = 16, pages: int | None = None,
                 max_length: int | None = None, prefill_chunk: int = 256, stopping: Stopping = Stopping(),
                 speculative: int = 0, ngram: int = 3, prefix_sharing: bool = True, draft_model=None,
                 cache_dtype=None, decode_steps: int = 8, decode_tokens: int = 128, prefill_tokens: int = 8192):
        config = model.config
        max_length = config.max_length if max_length is None else max_length
        for name, value in (("slots", slots), ("page_size", page_size), ("max_length", max_length),
                            ("prefill_chunk", prefill_chunk), ("ngram", ngram), ("decode_steps", decode_steps),
                            ("decode_tokens", decode_tokens), ("prefill_tokens", prefill_tokens)):
            check_int(name, value)
        check_int("speculative", speculative, minimum=0)
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
        check_int("pages", pages, minimum=2)
        self.pool = PagePool(pages)
        self.prefill_chunk, self.prefill_tokens, self.stopping = prefill_chunk, prefill_tokens, stopping
        self.speculative, self.prefix_sharing, self.decode_steps = speculative, prefix_sharing, decode_steps
        self.decode_tokens = decode_tokens
        layout = dict(slots=slots, pages=pages, page_size=page_size, pages_per_sequence=self.pages_per_sequence,
                      cache_dtype=cache_dtype)
        self.runner = ModelRunner(model, **layout)
        self.drafts = PromptLookup(ngram) if draft_model is None else DraftModel(ModelRunner(draft_model, **layout),
                                                                                 speculative)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence | None] = [None] * slots
        self.finished: deque[Result] = deque()
        self.deltas: dict[object, Delta] = {}  # this step's, by request id (take_deltas)
        self.next_id = 0
        self.stats = EngineStats()
        self.on_step: Callable | None = None  # called after every step with the engine (figures, tests)
        self.in_flight: tuple[list[Sequence], StepsInFlight] | None = None  # (its rows, the call): _several_steps

    # ----------------------------------------------------------------- the interface

    def submit(self, prompt, *, max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0, id=None):
        """Queues a request (a 1-D array of token ids); returns its id. A request that can
        never fit finishes at once with ``finish_reason="error"``."""
        request_id = self.next_id if id is None else id
        self.next_id += 1
        prompt = [int(t) for t in np.asarray(prompt).reshape(-1)]
        sequence = Sequence(request_id, prompt, len(prompt), int(max_new_tokens), sampling, int(seed), time.perf_counter())
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
            self._delta(request_id).finish_reason = "error"
        else:
            self.waiting.append(sequence)
        return request_id

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.running) or self.in_flight is not None

    def step(self) -> list[Result]:
        """Admits what fits, runs one prefill chunk and one decode step; returns the requests
        that finished (errors included). A step that can do nothing while requests wait (no
        sequence runs and none can be admitted) is a ``RuntimeError``, not a silent loop."""
        calls_before = self.runner.calls
        self.deltas = {}  # this step's only: a server takes them after every step
        if self.in_flight is not None and (self.waiting or not _same(self.in_flight[0], self._running())):
            rows, launched = self.in_flight  # a call queued last step, and something else must happen first
            self.in_flight = None
            self._land(rows, launched)
        self._admit()
        if any(s is not None and s.in_prefill for s in self.running):
            self._prefill()
        if any(s is not None and not s.in_prefill for s in self.running):
            self._decode()
        if self.runner.calls == calls_before and self.waiting and not self.finished:
            raise RuntimeError(
                f"the engine cannot make progress: {len(self.waiting)} request(s) wait, none runs, and the pool has "
                f"{self.pool.available} of {self.pool.pages - 1} pages available ({self.pool.in_use} held); the next "
                f"needs {-(-(len(self.waiting[0].tokens) + 1) // self.page_size)}")
        self.stats.steps += 1
        self.stats.calls = self.runner.calls + self.drafts.calls
        self.stats.memory.append((self.pool.in_use * self.page_size, self._tokens_held()))
        self.stats.peak_pages = max(self.stats.peak_pages, self.pool.in_use)
        if self.on_step is not None:
            self.on_step(self)
        return self.finished_now()

    def run(self) -> Iterator[Result]:
        """Steps until every submitted request has finished, yielding each as it finishes."""
        yield from self.finished_now()
        while self.busy:
            yield from self.step()

    def abort(self, request_id) -> bool:
        """Ends a request now (a client went away), wherever it is: waiting, or running (its
        pages go back to the pool). It finishes with ``finish_reason="abort"``. False if the
        engine does not hold it (it has finished already)."""
        for sequence in self.waiting:
            if sequence.id == request_id:
                self.waiting.remove(sequence)
                self._finish(sequence, "abort", release=False)
                return True
        for sequence in self.running:
            if sequence is not None and sequence.id == request_id:
                self._finish(sequence, "abort")
                return True
        return False

    def take_deltas(self) -> list[Delta]:
        """What the last step added to each request and who finished in it (and, taken before
        the next step, the requests ``submit`` or ``abort`` ended). Each step starts afresh."""
        deltas = list(self.deltas.values())
        self.deltas = {}
        return deltas

    def _delta(self, request_id) -> Delta:
        return self.deltas.setdefault(request_id, Delta(request_id, []))

    def finished_now(self) -> list[Result]:
        done = list(self.finished)
        self.finished.clear()
        return done

    def warm_up(self) -> int:
        """Compiles every shape a step may call (each bucket of rows with each bucket of
        tokens: prefill chunks, decode, verify, draft), as a server does before it takes
        requests, so that no request waits for a compiler. Every row is padding: nothing is
        written but the trash page. Returns the number of shapes."""
        rows = sorted({bucket(n, self.slots) for n in range(1, self.slots + 1)})
        chunks = {R: sorted({bucket(n, self._chunk(R), smallest=16) for n in range(1, self._chunk(R) + 1)})
                  for R in rows}  # the prefill chunks of each bucket of rows
        verify = sorted({bucket(n, 1 + self.speculative, smallest=2) for n in range(2, 2 + self.speculative)})
        calls = {R: [(T, False) for T in chunks[R] + [1]] + [(T, True) for T in verify]  # (tokens, all positions)
                 for R in rows}
        for R in rows:
            for T, all_positions in calls[R]:
                self.runner.call([], T, lengths_of=_cached_length, all_positions=all_positions, R=R)
        several = [R for R in rows if self._most_steps(R) > 1 and not self.speculative]  # calls of several steps
        for R in several:
            options = dict(count=self.decode_steps, stopping=self.stopping, lengths_of=_cached_length, R=R)
            self.runner.steps([], self.decode_steps, after=self.runner.steps([], self.decode_steps, **options),
                              **options)  # a first call, and one queued behind it
        shapes = sum(len(calls[R]) for R in rows) + len(several) + \
            self.drafts.warm_up(chunks)
        jax.block_until_ready(self.runner.cache)
        return shapes

    # ----------------------------------------------------------------- admission

    def _prefix_keys(self, tokens: list[int]) -> list[tuple]:
        return prefix_keys(tokens, self.page_size) if self.prefix_sharing else []

    def _pending_prefixes(self) -> set:
        """Prefixes some running sequence is computing now: a request that needs one waits for it."""
        pending = set()
        for sequence in self.running:
            if sequence is not None and sequence.in_prefill:
                keys = self._prefix_keys(sequence.tokens[: sequence.prompt_length])
                pending.update(keys[sequence.cached // self.page_size:])
        return pending

    def _admit(self) -> None:
        pending = self._pending_prefixes()
        deferred = deque()
        while self.waiting and None in self.running:
            sequence = self.waiting.popleft()
            keys = self._prefix_keys(sequence.tokens)
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
            self.stats.shared_pages += matched
            self.running[sequence.slot] = sequence
            pending.update(keys[matched:])
        self.waiting.extendleft(reversed(deferred))

    def _ensure_pages(self, sequence: Sequence, tokens: int) -> bool:
        """Gives ``sequence`` pages for ``tokens`` tokens; False when the pool runs out."""
        while len(sequence.pages) * self.page_size < tokens:
            if not self.pool.available:
                return False
            sequence.pages.append(self.pool.take())
        return True

    def _preempt(self, keep: Sequence) -> bool:
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
        self.stats.preempted += 1
        return True

    def _release(self, sequence: Sequence) -> None:
        for page in reversed(sequence.pages):  # the deepest pages of a prefix are reused first, its start last
            self.pool.release(page)
        sequence.pages = []

    # ----------------------------------------------------------------- the calls

    def _prefill(self) -> None:
        chunks = {}
        chunk = self._chunk(sum(s is not None and s.in_prefill for s in self.running))
        for sequence in list(self.running):
            if sequence is None or sequence.slot < 0 or not sequence.in_prefill:  # slot -1: preempted by an earlier row
                continue
            todo = sequence.tokens[sequence.cached : sequence.cached + chunk]
            while not self._ensure_pages(sequence, sequence.cached + len(todo)):
                if not self._preempt(sequence):
                    raise RuntimeError("the page pool cannot hold one sequence's prompt")
            chunks[sequence.slot] = (sequence, todo)
        rows = [(sequence, todo) for sequence, todo in chunks.values() if sequence.slot >= 0]  # not preempted since
        if not rows:
            return
        T = bucket(max(len(todo) for _, todo in rows), chunk, smallest=16)
        sampled, _ = self.runner.call(rows, T, lengths_of=_cached_length)
        self.drafts.prefill(rows, T)  # a draft model reads the same prompt into its own pools
        for row, (sequence, todo) in enumerate(rows):
            sequence.cached += len(todo)
            sequence.draft_cached = sequence.cached
            self._register_prefix(sequence)
            if sequence.cached == len(sequence.tokens):  # the prompt is in: its last logits give a token
                self._accept(sequence, [int(sampled[row])])

    def _chunk(self, rows: int) -> int:
        """The most prompt tokens a row prefills in a call over ``rows`` rows: ``prefill_chunk``,
        halved (not below 16) until the call's bucket of rows times it is ``prefill_tokens`` or less."""
        R, chunk = bucket(rows, self.slots), self.prefill_chunk
        while chunk > 16 and R * chunk > self.prefill_tokens:
            chunk = max(16, chunk // 2)
        return chunk

    def _register_prefix(self, sequence: Sequence) -> None:
        keys = self._prefix_keys(sequence.tokens[: sequence.prompt_length])
        for index in range(min(len(keys), sequence.cached // self.page_size)):
            self.pool.register(keys[index], sequence.pages[index])

    def _room(self, sequence: Sequence) -> int:
        """How many tokens ``sequence`` may draft this step: k, fewer near its limit, none
        when it samples (an accepted draft is a greedy token, not a sample)."""
        if not self.speculative or sequence.sampling.temperature > 0:
            return 0
        return max(0, min(self.speculative, sequence.max_new_tokens - len(sequence.generated) - 1))

    def _decode(self) -> None:
        for sequence in list(self.running):  # pages first: the draft model writes into them too
            if sequence is None or sequence.slot < 0 or sequence.in_prefill:  # slot -1: preempted by an earlier row
                continue
            while not self._ensure_pages(sequence, sequence.cached + 1 + self._room(sequence)):
                if not self._preempt(sequence):
                    raise RuntimeError("the page pool cannot hold one sequence")
        decoding = [sequence for sequence in self.running if sequence is not None and not sequence.in_prefill]
        if not decoding:
            return
        if self._several_steps(decoding):
            return
        drafts = self.drafts.propose(decoding, self._room)
        rows = [(sequence, [sequence.tokens[-1]] + drafts.get(sequence.slot, [])) for sequence in decoding]
        longest = max(len(new) for _, new in rows)
        if longest == 1:  # nothing drafted this step: a plain decode step
            sampled, _ = self.runner.call(rows, 1, lengths_of=_cached_length)
            for row, (sequence, _) in enumerate(rows):
                sequence.cached += 1
                self._accept(sequence, [int(sampled[row])])
            return
        T = bucket(longest, 1 + self.speculative, smallest=2)
        sampled, greedy = self.runner.call(rows, T, lengths_of=_cached_length, all_positions=True)  # [R], [R, T]
        for row, (sequence, new) in enumerate(rows):
            proposed = new[1:]  # a sampled row proposes nothing: its token is the sampled one
            accepted = 0
            while accepted < len(proposed) and proposed[accepted] == greedy[row, accepted]:
                accepted += 1
            self.stats.drafted += len(proposed)
            self.stats.accepted += accepted
            # The last token and the accepted drafts stay; the rest is rolled back (not counted).
            sequence.cached += 1 + accepted
            sequence.draft_cached = min(sequence.draft_cached, sequence.cached)
            next_token = sampled[row] if sequence.sampling.temperature > 0 else greedy[row, accepted]
            self._accept(sequence, proposed[:accepted] + [int(next_token)])

    def _several_steps(self, decoding: list[Sequence]) -> bool:
        """Several decode steps in one call (``_launch``), when nothing else could happen in them;
        False, and nothing done, otherwise. While one call runs, the next is queued behind it
        (when it too may run) before this one's tokens are read, so that the device does not
        wait for Python between them; it is read at the next step."""
        launched = self.in_flight[1] if self.in_flight is not None else self._launch(decoding)
        if launched is None:
            return False
        following = self._launch(decoding, after=launched)
        self.in_flight = None if following is None else (decoding, following)
        self._land(decoding, launched)
        return True

    def _launch(self, decoding: list[Sequence], *, after: StepsInFlight | None = None) -> StepsInFlight | None:
        """Queues up to ``_most_steps`` steps over ``decoding`` in one call (after the call
        ``after``, over the same rows), when no request waits, none is in its prefill, and no
        drafts: as many as the nearest limit allows (at least 2), with the pages for all of them
        taken now. None, and no call, otherwise."""
        ahead = 0 if after is None else after.count  # the tokens each row will have gained by then
        if self.speculative or self.waiting or len(decoding) != len(self._running()):
            return None
        count = min(self._most_steps(len(decoding)), *(sequence.max_new_tokens - len(sequence.generated) - ahead
                                                        for sequence in decoding))
        if count < 2:
            return None
        if not all(self._ensure_pages(sequence, sequence.cached + ahead + count) for sequence in decoding):
            return None  # pages taken stay with their sequence: its next tokens use them
        return self.runner.steps([(sequence, [sequence.tokens[-1]]) for sequence in decoding], self.decode_steps,
                                 count=count, stopping=self.stopping, lengths_of=_cached_length, after=after)

    def _most_steps(self, rows: int) -> int:
        """The most decode steps one call over ``rows`` rows may run: ``decode_steps``, fewer when
        its bucket of rows times them would pass ``decode_tokens``."""
        return min(self.decode_steps, self.decode_tokens // bucket(rows, self.slots))

    def _land(self, decoding: list[Sequence], launched: StepsInFlight) -> None:
        """Reads a call of several steps and gives each row its tokens, unless it has finished
        since the call was queued (an end token in the call before, an abort)."""
        sampled, taken = launched.read()  # [R, decode_steps], the first taken run
        for row, sequence in enumerate(decoding):
            if self.running[sequence.slot] is sequence:
                sequence.cached += taken  # the last token and the first taken - 1 sampled ones are written
                self._accept(sequence, [int(token) for token in sampled[row, :taken]])

    def _running(self) -> list[Sequence]:
        return [sequence for sequence in self.running if sequence is not None]

    def _accept(self, sequence: Sequence, new_tokens: list[int]) -> None:
        """Appends tokens until the end token or the limit; finishes the sequence there."""
        if sequence.first_token_s is None:
            sequence.first_token_s = time.perf_counter() - sequence.submitted
        for token in new_tokens:
            sequence.tokens.append(token)
            self._delta(sequence.id).tokens.append(token)
            self.stats.tokens += 1
            if self.stopping.ids and token in self.stopping.ids:
                return self._finish(sequence, "eos")
            if len(sequence.generated) >= sequence.max_new_tokens:
                return self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str, *, release: bool = True) -> None:
        if release:
            self._release(sequence)
            self.running[sequence.slot] = None
        self._delta(sequence.id).finish_reason = reason
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
