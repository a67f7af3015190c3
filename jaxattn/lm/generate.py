"""Text generation: prefill the prompt into the KV cache, then decode in one compiled loop.

``generate`` runs the whole generation as one ``jax.jit``-compiled program: a prefill
call over the (padded, possibly ragged) prompts, then a ``lax.while_loop`` over decode
steps, each feeding one token per sequence through the model with its cache. A row ends
when it writes one of the checkpoint's end-of-sequence tokens (``Stopping``: the one rule,
which the serving engine uses too) or at ``max_new_tokens``; finished rows are padded, and
the loop stops when every row has finished. With ``use_cache=False`` every step re-runs the
model over the whole token buffer instead, which is the baseline the cache is measured against.

Shape letters: B batch, P padded prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import io_callback

from jaxattn.lm.sampling import Sampling, sample_token
from jaxattn.nn.transformer import cache_dtype as cache_dtype_of


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stopping:
    """When a sequence ends: at the first token in ``ids`` (the checkpoint's end-of-sequence
    tokens; it is kept in the output, as transformers keeps it), or at the length limit. After
    that, the row is filled with ``pad_id``. ``Stopping()`` never stops early.

    A pytree: the ids and the pad id are values of the compiled program, not part of it, so
    models that differ only in their end tokens share one compiled generation."""

    ids: tuple[int, ...] = ()
    pad_id: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer, *, ignore_eos: bool = False) -> "Stopping":
        """The tokenizer's checkpoint's end-of-sequence tokens (none with ``ignore_eos``)."""
        ids = () if ignore_eos else tuple(getattr(tokenizer, "stop_ids", ()))
        pad = getattr(tokenizer, "pad_id", None)
        return cls(ids, pad if pad is not None else (ids[0] if ids else 0))

    def ends(self, tokens):
        """bool, the shape of ``tokens``: does this token end its sequence?"""
        if not self.ids:
            return jnp.zeros(jnp.shape(tokens), bool)
        return jnp.isin(tokens, jnp.stack([jnp.asarray(i, jnp.int32) for i in self.ids]))

    def lengths(self, tokens) -> np.ndarray:
        """int ``[B]``: how many tokens each row of ``tokens [B, N]`` generated, its end token included."""
        tokens = np.asarray(tokens)
        ended = np.isin(tokens, np.asarray(self.ids, np.int64)) if self.ids else np.zeros(tokens.shape, bool)
        first = np.where(ended.any(axis=1), ended.argmax(axis=1) + 1, tokens.shape[1])
        return first.astype(np.int32)


def pad_prompts(prompts):
    """A list of 1-D token arrays -> ``(tokens int32 [B, P], lengths int32 [B])``, right-padded."""
    prompts = [np.asarray(p, dtype=np.int32).reshape(-1) for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), P), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


def make_decode_step(graphdef):
    """``decode_step(params, token [B], cache) -> (logits [B, V], new_cache)``: one token
    per sequence through the model. Its shapes do not depend on the position, so a
    jitted decode step compiles once for a whole generation."""

    def decode_step(params, token, cache):
        logits, cache = nnx.merge(graphdef, params)(token[:, None], cache=cache)
        return logits[:, 0], cache

    return decode_step


def _decode_loop(next_token, carry, *, until: int, keys, stopping: Stopping, on_tokens=None):
    """The loop both paths share: ``next_token(state, token, key) -> (token, state)`` writes token
    i of every running row, until every row has stopped or ``until`` tokens are written.
    ``carry``: ``(i, token, done [B], out [B, N], state)``; returns the same."""

    def running(carry):
        i, _, done, _, _ = carry
        return (i < until) & ~jnp.all(done)

    def step(carry):
        i, token, done, out, state = carry
        token, state = next_token(state, token, keys[i])
        return _write(i, token, done, out, stopping, on_tokens) + (state,)

    return lax.while_loop(running, step, carry)


def _write(i, token, done, out, stopping: Stopping, on_tokens=None):
    """Token i of each row into ``out`` (a finished row only pads); returns ``(i + 1, token, done, out)``.
    ``on_tokens(tokens [B])``, when given, is called on the host with them as they are written."""
    token = jnp.where(done, stopping.pad_id, token)
    if on_tokens is not None:
        io_callback(lambda tokens: on_tokens(np.asarray(tokens)), None, token, ordered=True)
    out = lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
    return i + 1, token, done | stopping.ends(token), out


def _start(first, max_new_tokens: int, stopping: Stopping, on_tokens=None):
    """``(i, token, done, out)`` once the prefill has sampled token 0."""
    out = jnp.full((first.shape[0], max_new_tokens), stopping.pad_id, jnp.int32)
    return _write(jnp.zeros((), jnp.int32), first, jnp.zeros(first.shape, bool), out, stopping, on_tokens)


def longrope_switch(config, P: int, max_new_tokens: int) -> int | None:
    """The step at which transformers recomputes the whole cache of a LongRoPE model (Phi-3): the
    first step whose sequence, ``P + i`` tokens, is longer than the original context, when the
    prompt is not. From then on every key is rotated with the long factors, as an uncached pass
    would. ``None`` when the generation never crosses."""
    scaling = getattr(config, "rope_scaling", None)
    if scaling is None or scaling.kind != "longrope":
        return None
    step = scaling.original_max_length + 1 - P
    return step if 1 <= step < max_new_tokens else None


# XLA moves work that does not change between iterations out of a loop ("loop-invariant code
# motion"). For bfloat16 or int8 weights (jaxattn.lm.quantize) that work is their conversion: XLA
# would make a float32 copy of every weight before the decode loop and read that copy each step,
# so narrow weights would decode slower than float32 ones (benchmarks/decode_profile.py measured
# int8 GPT-2 small at 0.8x float32 with it, 26.6 against 32.9 tokens/s, and 1.5x without). Without
# the pass, each step converts inside the fused matrix-vector products and reads only the narrow
# weights.
DECODE_LOOP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "cache_length", "cache_dtype", "on_tokens"),
         compiler_options=DECODE_LOOP_COMPILER_OPTIONS)
def _generate_cached(graphdef, params, prompt, lengths, key, stopping, *, max_new_tokens, sampling, cache_length,
                     cache_dtype, on_tokens=None):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    # Created inside the program and carried through the loop: every step writes into the
    # same buffers (in place), no step copies the cache.
    # (A window cache holds window + P - 1 slots.)
    cache = model.init_cache(B, max_length=cache_length, chunk=P, dtype=cache_dtype)
    logits, cache = model(prompt, cache=cache, num_new=lengths, logits_at=(lengths - 1)[:, None])  # prefill: [B, 1, V]
    keys = jax.random.split(key, max_new_tokens)
    decode_step = make_decode_step(graphdef)

    def next_token(cache, token, key):
        logits, cache = decode_step(params, token, cache)
        with jax.named_scope("sampling"):
            return sample_token(logits, key, sampling), cache

    carry = _start(sample_token(logits[:, 0], keys[0], sampling), max_new_tokens, stopping, on_tokens) + (cache,)
    switch = longrope_switch(model.config, P, max_new_tokens)
    if switch is not None:  # run to the switch, then prefill everything so far again, with the long factors
        i, token, done, out, _ = _decode_loop(next_token, carry, until=switch, keys=keys, stopping=stopping,
                                              on_tokens=on_tokens)
        sequence = jnp.zeros((B, P + switch), jnp.int32).at[:, :P].set(prompt)
        sequence = jax.vmap(lambda row, new, start: lax.dynamic_update_slice(row, new, (start,)))(
            sequence, out[:, :switch], lengths)  # [B, P + switch]: each row's prompt, then its new tokens
        cache = model.init_cache(B, max_length=cache_length, chunk=P + switch, dtype=cache_dtype)
        logits, cache = model(sequence, cache=cache, num_new=lengths + switch, logits_at=(lengths + switch - 1)[:, None])
        token = sample_token(logits[:, 0], keys[switch], sampling)
        carry = _write(i, token, done, out, stopping, on_tokens) + (cache,)
    return _decode_loop(next_token, carry, until=max_new_tokens, keys=keys, stopping=stopping,
                        on_tokens=on_tokens)[3]  # [B, N]


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "on_tokens"))
def _generate_uncached(graphdef, params, prompt, lengths, key, stopping, *, max_new_tokens, sampling, on_tokens=None):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    buffer = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompt)  # [B, P + N]
    slots = jnp.arange(P + max_new_tokens)[None]  # [1, P + N]
    keys = jax.random.split(key, max_new_tokens)

    def logits_of(buffer, lengths):
        # The whole buffer, every step. Its empty slots are a segment of their own at position 0,
        # so that the tokens present see only each other and the positions are the sequence's
        # (RoPE that follows the length, dynamic or LongRoPE, sees the length so far).
        empty = slots >= lengths[:, None]  # [B, P + N]
        logits = model(buffer, jnp.where(empty, 0, slots), segment_ids=empty.astype(jnp.int32),
                       logits_at=(lengths - 1)[:, None])  # [B, 1, V]
        return logits[:, 0]

    def write(row, token, position):
        return lax.dynamic_update_slice(row, token[None], (position,))

    def next_token(state, token, key):
        buffer, lengths = state
        buffer, lengths = jax.vmap(write)(buffer, token, lengths), lengths + 1
        return sample_token(logits_of(buffer, lengths), key, sampling), (buffer, lengths)

    first = sample_token(logits_of(buffer, lengths), keys[0], sampling)
    carry = _start(first, max_new_tokens, stopping, on_tokens) + ((buffer, lengths),)
    return _decode_loop(next_token, carry, until=max_new_tokens, keys=keys, stopping=stopping,
                        on_tokens=on_tokens)[3]  # [B, N]


def generate(
    model,
    prompts,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    use_cache: bool = True,
    cache_length: int | None = None,
    cache_dtype: str | None = None,
    stopping: Stopping = Stopping(),
    on_tokens=None,
):
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: a ``TransformerLM``.
      prompts: a list of 1-D int token arrays (lengths may differ).
      max_new_tokens: N, the number of tokens to generate per prompt.
      sampling: greedy, temperature, top-k, top-p.
      seed: the sampling seed.
      use_cache: decode with the KV cache (True) or re-run the model on the whole
        buffer for every token (False).
      cache_length: the cache's capacity S_max (default: the longest prompt plus N).
      cache_dtype: the cache's entries: the model's dtype (default), or ``"int8"`` (a scale per
        token and head, dequantized a block at a time by the decode kernel; prompts too are then
        attended through the int8 cache).
      stopping: when a row ends (``Stopping.for_tokenizer(tokenizer)``: at the checkpoint's
        end-of-sequence tokens); the default never stops before N.
      on_tokens: a function called on the host with each step's tokens, int32 ``[B]`` (a finished
        row's are ``stopping.pad_id``), as the compiled loop writes them: to stream text. It is
        part of the compiled program (pass the same function to reuse it).

    Returns:
      int32 ``[B, N]`` new tokens; after a row's end token, ``stopping.pad_id``
      (``stopping.lengths(tokens)`` says how many each row generated).
    """
    tokens, lengths = pad_prompts(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model.config.max_length
    if tokens.shape[1] + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {tokens.shape[1]} tokens plus {max_new_tokens} new tokens exceeds the "
            f"model's context length max_length={context}"
        )
    needed = tokens.shape[1] + max_new_tokens
    cache_length = needed if cache_length is None else cache_length
    if cache_length < needed:
        raise ValueError(f"cache_length={cache_length} cannot hold a prompt of {tokens.shape[1]} plus {max_new_tokens} new tokens")
    graphdef, params = nnx.split(model)
    arguments = (graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed), stopping)
    if use_cache:
        cache_dtype = None if cache_dtype is None else str(cache_dtype_of(model.config, cache_dtype))
        return _generate_cached(*arguments, max_new_tokens=max_new_tokens, sampling=sampling, cache_length=cache_length,
                                cache_dtype=cache_dtype, on_tokens=on_tokens)
    if cache_dtype is not None:
        raise ValueError(f"cache_dtype={cache_dtype!r} needs use_cache=True")
    return _generate_uncached(*arguments, max_new_tokens=max_new_tokens, sampling=sampling, on_tokens=on_tokens)
