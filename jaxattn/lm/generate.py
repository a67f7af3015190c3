"""Text generation: prefill the prompt into the KV cache, then decode in one compiled loop.

``generate`` runs the whole generation as one ``jax.jit``-compiled program: a prefill
call over the (padded, possibly ragged) prompts, then ``lax.scan`` over decode steps,
each feeding one token per sequence through the model with its cache. With
``use_cache=False`` every step re-runs the model over the whole token buffer instead,
which is the baseline the cache is measured against.

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



@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` is greedy (argmax);
    ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose
    probability reaches p (nucleus sampling, Holtzman et al. 2020)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits, key, sampling: Sampling):
    """logits float32 ``[B, V]`` -> token ids int32 ``[B]``.

    Tokens outside top-k / top-p get a logit of -inf: probability exactly 0. Top-k keeps
    every token tied with the k-th largest; top-p keeps a token when the probability of
    the tokens ranked before it is *below* p (so the kept set is the smallest whose total
    reaches p; with ties, the earlier token id ranks first).
    """
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth_largest = lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, V], most likely first
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of the tokens ahead
        keep_sorted = before < sampling.top_p  # the first token is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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


def _last_logits(logits, lengths):  # [B, P, V], [B] -> [B, V]
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "cache_length"))
def _generate_cached(graphdef, params, prompt, lengths, key, *, max_new_tokens, sampling, cache_length):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    # Created inside the program and carried through the scan: every step writes into the
    # same buffers (lax.dynamic_update_slice in place), no step copies the cache.
    cache = model.init_cache(B, max_length=cache_length, chunk=P)  # a window cache: window + P - 1 slots
    logits, cache = model(prompt, cache=cache, num_new=lengths)  # prefill: [B, P, V]
    keys = jax.random.split(key, max_new_tokens)
    first = sample_token(_last_logits(logits, lengths), keys[0], sampling)  # [B]
    decode_step = make_decode_step(graphdef)

    def step(carry, key):
        token, cache = carry
        logits, cache = decode_step(params, token, cache)
        return (sample_token(logits, key, sampling), cache), token

    (last, _), tokens = lax.scan(step, (first, cache), keys[1:])  # tokens 1..N-1: [N - 1, B]
    return jnp.concatenate([tokens, last[None]], axis=0).T  # [B, N]


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate_uncached(graphdef, params, prompt, lengths, key, *, max_new_tokens, sampling):
    model = nnx.merge(graphdef, params)
    B, P = prompt.shape
    buffer = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompt)  # [B, P + N]

    def write(row, token, position):
        return lax.dynamic_update_slice(row, token[None], (position,))

    def step(carry, key):
        buffer, lengths = carry
        logits = model(buffer)  # the whole buffer, every step: [B, P + N, V]
        token = sample_token(_last_logits(logits, lengths), key, sampling)
        return (jax.vmap(write)(buffer, token, lengths), lengths + 1), token

    _, tokens = lax.scan(step, (buffer, lengths), jax.random.split(key, max_new_tokens))  # [N, B]
    return tokens.T  # [B, N]


def generate(
    model,
    prompts,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    use_cache: bool = True,
    cache_length: int | None = None,
):
    """Continues each prompt by ``max_new_tokens`` tokens.

    Args:
      model: a ``TransformerLM``.
      prompts: a list of 1-D int token arrays (lengths may differ).
      max_new_tokens: N, the number of tokens to generate per prompt.
      sampling: greedy, temperature, top-k, top-p.
      seed: the sampling seed.
      use_cache: decode with the KV cache (True) or re-run the model on the whole
        buffer for every token (False).
      cache_length: the cache's capacity S_max (default: the longest prompt plus N).

    Returns:
      int32 ``[B, N]`` new tokens.
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
    arguments = (graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed))
    if use_cache:
        return _generate_cached(*arguments, max_new_tokens=max_new_tokens, sampling=sampling, cache_length=cache_length)
    return _generate_uncached(*arguments, max_new_tokens=max_new_tokens, sampling=sampling)
