"""The paged caches: writes land where the page table says, and the decode kernel reading
pages equals dense attention over the same keys gathered (ragged rows, GQA, windows,
MLA's latents, one token or a chunk)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import (
    AttentionContext,
    KVCache,
    LatentCache,
    PagedKVCache,
    PagedLatentCache,
    decode_kernel,
    multi_head_attention,
)
from jaxattn.functional.kv_cache import TRASH_PAGE
from tests.reference import normal

B, K, H, D, PAGE, N, P = 3, 2, 4, 8, 4, 5, 24


def shuffled_tables(seed=0):
    """Every row gets N distinct pages of the pool, in a random order (never the trash page)."""
    pages = np.random.default_rng(seed).permutation(np.arange(1, P))[: B * N]
    return jnp.asarray(pages.reshape(B, N), jnp.int32)


def gathered(pool, table):
    """The keys a row's pages hold, in order: ``[B, N * page, ...]`` (a reference, by NumPy indexing)."""
    pool, table = np.asarray(pool), np.asarray(table)
    return jnp.asarray(pool[table].reshape((table.shape[0], -1) + pool.shape[2:]))


def test_writes_follow_the_page_table_and_padding_goes_to_the_trash_page():
    table = shuffled_tables()
    paged = PagedKVCache.create(batch=B, pages=P, page_size=PAGE, pages_per_sequence=N, kv_heads=K, head_dim=D)
    paged = paged._replace(page_table=table)
    dense = KVCache.create(batch=B, max_length=N * PAGE, kv_heads=K, head_dim=D)
    num_new = jnp.array([7, 2, 5])
    for step, T in enumerate((7, 1, 3)):  # a ragged prompt, a decode step, a chunk
        k, v = normal((B, T, K, D), seed=step), normal((B, T, K, D), seed=10 + step)
        view, paged = paged.update(k, v, num_new if step == 0 else None)
        _, dense = dense.update(k, v, num_new if step == 0 else None)
        chex.assert_trees_all_equal(view.pages, table)
    lengths = np.asarray(paged.lengths)
    chex.assert_trees_all_equal(lengths, dense.lengths)
    for b in range(B):  # every real token where the table says; the rest of the rows' pages untouched
        chex.assert_trees_all_equal(gathered(paged.k, table)[b, : lengths[b]], dense.k[b, : lengths[b]])
        chex.assert_trees_all_equal(gathered(paged.v, table)[b, : lengths[b]], dense.v[b, : lengths[b]])
    untouched = np.setdiff1d(np.arange(1, P), np.asarray(table))
    assert not np.asarray(paged.k)[untouched].any()  # pages no row owns were never written
    assert paged.capacity == N * PAGE and not paged.overflowed().any()


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block_kv", [None, PAGE])  # PAGE: a block of one page, so the walk from page to page runs
def test_decode_over_pages_equals_attention_over_the_gathered_keys(T, window, block_kv):
    table = shuffled_tables(1)
    lengths = jnp.array([17, 4, 11])  # tokens held after this call (its T included)
    k_pool, v_pool = normal((P, PAGE, K, D), seed=1), normal((P, PAGE, K, D), seed=2)
    q = normal((B, T, H, D), seed=3)
    sinks = normal((H,), seed=4)
    context = AttentionContext.for_tokens(T, lengths=lengths - T).with_keys(
        jnp.broadcast_to(jnp.arange(N * PAGE), (B, N * PAGE)), lengths, table).for_layer(window=window, sinks=sinks)
    paged = decode_kernel(q, k_pool, v_pool, context, **({} if block_kv is None else {"block_kv": block_kv}))
    k, v = gathered(k_pool, table), gathered(v_pool, table)  # [B, N * page, K, D]
    expected = multi_head_attention(q, k, v, is_causal=True, q_positions=lengths[:, None] - T + jnp.arange(T),
                                    kv_lengths=lengths, window=window, sinks=sinks)
    chex.assert_trees_all_close(paged, expected, atol=2e-6, rtol=1e-5)


class PagedDecodeVariantsTest(chex.TestCase):
    """The same kernel traced once and run op by op (chex's variants): a chunk of 3 queries, a
    window, a block of one page."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_decode_over_pages_with_and_without_jit(self):
        table, lengths, T = shuffled_tables(2), jnp.array([13, 20, 3]), 3
        k_pool, v_pool, q = normal((P, PAGE, K, D), seed=5), normal((P, PAGE, K, D), seed=6), normal((B, T, H, D), seed=7)

        def attend(q, k_pool, v_pool):
            context = AttentionContext.for_tokens(T, lengths=lengths - T).with_keys(
                jnp.broadcast_to(jnp.arange(N * PAGE), (B, N * PAGE)), lengths, table).for_layer(window=6)
            return decode_kernel(q, k_pool, v_pool, context, block_kv=PAGE)

        expected = multi_head_attention(q, gathered(k_pool, table), gathered(v_pool, table), is_causal=True,
                                        q_positions=lengths[:, None] - T + jnp.arange(T), kv_lengths=lengths, window=6)
        chex.assert_trees_all_close(self.variant(attend)(q, k_pool, v_pool), expected, atol=2e-6, rtol=1e-5)


def test_mla_latents_in_pages_equal_their_dense_cache():
    L, R, T = 10, 4, 2
    table = shuffled_tables(2)
    paged = PagedLatentCache.create(batch=B, pages=P, page_size=PAGE, pages_per_sequence=N, latent_dim=L, rope_dim=R)
    paged = paged._replace(page_table=table)
    dense = LatentCache.create(batch=B, max_length=N * PAGE, latent_dim=L, rope_dim=R)
    c, r = normal((B, 9, L), seed=5), normal((B, 9, R), seed=6)
    num_new = jnp.array([9, 6, 3])
    _, paged = paged.update(c, r, num_new)
    _, dense = dense.update(c, r, num_new)
    c, r = normal((B, T, L), seed=7), normal((B, T, R), seed=8)
    view, paged = paged.update(c, r)
    dense_view, dense = dense.update(c, r)
    q = (normal((B, T, H, L), seed=9), normal((B, T, H, R), seed=10))  # MLA's absorbed query parts
    start = jnp.asarray(dense.lengths) - T
    make = lambda view, pages: AttentionContext.for_tokens(T, lengths=start).with_keys(  # noqa: E731
        view.positions, view.lengths, pages)
    out = decode_kernel(q, (view.c_kv, view.k_rope), view.c_kv, make(view, view.pages))
    expected = decode_kernel(q, (dense_view.c_kv, dense_view.k_rope), dense_view.c_kv, make(dense_view, None))
    chex.assert_trees_all_close(out, expected, atol=2e-6, rtol=1e-5)


def test_bad_pools_and_tables_are_refused():
    with pytest.raises(ValueError, match="at least 2 pages"):
        PagedKVCache.create(batch=1, pages=1, page_size=4, pages_per_sequence=2, kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="page_size must be an integer >= 1"):
        PagedKVCache.create(batch=1, pages=4, page_size=0, pages_per_sequence=2, kv_heads=1, head_dim=4)
    cache = PagedKVCache.create(batch=2, pages=4, page_size=4, pages_per_sequence=2, kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="do not fit the PagedKVCache"):
        cache.update(jnp.zeros((3, 1, 1, 4)), jnp.zeros((3, 1, 1, 4)))
    with pytest.raises(ValueError, match="has dtype bfloat16"):
        cache.update(jnp.zeros((2, 1, 1, 4), jnp.bfloat16), jnp.zeros((2, 1, 1, 4), jnp.bfloat16))
    context = AttentionContext.for_tokens(1, lengths=jnp.zeros(2, jnp.int32)).with_keys(
        jnp.zeros((2, 8), jnp.int32), jnp.ones(2, jnp.int32), jnp.full((2, 2), TRASH_PAGE))
    with pytest.raises(ValueError, match="pools \\[P, page, ...\\] of one page size"):
        decode_kernel(jnp.zeros((2, 1, 1, 4)), jnp.zeros((4, 4, 1, 4)), jnp.zeros((4, 2, 1, 4)), context)
