"""The NNX model: cached decoding equals the full forward pass, for every attention family."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.lm.generate import make_decode_step
from jaxattn.nn import Config, TransformerConfig, TransformerLM, cache_bytes_per_token, cache_elements_per_token

SMALL = dict(vocab_size=61, width=24, layers=2, heads=4, kv_heads=4, head_dim=6, mlp_hidden=40, max_length=32)
# Every mechanism of today's attention in one small model (3 layers: local, global, local-without-RoPE).
TODAY = dict(layers=3, kv_heads=2, head_dim=8, window=3, layer_types=("local", "global", "local"), local_rope_theta=100.0,
             rope_theta=10000.0, nope_layers=(2,), rotary_fraction=0.5, qk_norm="head", attention_softcap=5.0,
             final_softcap=3.0, attention_sinks=True, attention_scale=0.4, norm_placement="sandwich", embed_scale=True,
             mlp="geglu", rope_scaling=dict(kind="llama3", factor=4.0, original_max_length=8))


def tokens_for(B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 61, (B, T)), jnp.int32)


def jitted(model):
    graphdef, params = nnx.split(model)

    @jax.jit
    def full(params, tokens):
        return nnx.merge(graphdef, params)(tokens)

    @jax.jit
    def cached(params, tokens, cache, num_new=None):
        return nnx.merge(graphdef, params)(tokens, cache=cache, num_new=num_new)

    return params, full, cached


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # MHA, RoPE
        dict(kv_heads=2, mlp="gelu", norm="layer"),  # GQA
        dict(kv_heads=1, positions="learned", tied_embeddings=False),  # MQA
        dict(kv_heads=2, positions="sinusoidal", rope_style="interleaved"),
        dict(kv_heads=2, window=3),  # sliding window with the window-sized cache
        dict(attention="mla", latent_dim=10, rope_dim=4, query_latent_dim=8),  # MLA: latent cache, absorbed decode
        TODAY,  # local and global layers, QK-norm, soft-caps, sinks, NoPE, partial rotary, llama3 scaling, Gemma's blocks
        dict(kv_heads=2, qk_norm="projection", norm_placement="post", attention_sinks=True,
             rope_scaling=dict(kind="yarn", factor=4.0, original_max_length=8)),  # OLMo 2's blocks, YaRN
        dict(kv_heads=4, head_dim=8, mlp="gelu_exact", norm="layer", parallel_residual=True, rotary_fraction=0.25),  # NeoX
    ],
    ids=["mha-rope", "gqa-gelu-layernorm", "mqa-learned", "gqa-sinusoidal", "window-sliding-cache", "mla", "today",
         "olmo2-like", "neox-like"],
)
def test_prefill_then_decode_equals_full_forward(overrides):
    config = Config(**{**SMALL, **overrides, "positions": overrides.get("positions", "rope")})
    model = TransformerLM(config, rngs=nnx.Rngs(1))
    params, full, cached = jitted(model)
    B, T, prompt = 2, 11, 4
    tokens = tokens_for(B, T)
    expected = full(params, tokens)
    cache = model.init_cache(B, max_length=16, chunk=prompt)
    logits, cache = cached(params, tokens[:, :prompt], cache)
    steps = [logits]
    for t in range(prompt, T):
        logits, cache = cached(params, tokens[:, t : t + 1], cache)
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache[0].lengths, [T, T])
    for kind, layer_cache in zip(config.kinds(), cache):  # local: the window and the largest call (the prompt)
        if kind == "local":
            chex.assert_shape(layer_cache.k, (B, config.window + prompt - 1, config.kv_heads, config.head_dim))
        elif config.attention == "standard":
            chex.assert_shape(layer_cache.k, (B, 16, config.kv_heads, config.head_dim))
    if config.attention == "mla":
        chex.assert_shape(cache[0].c_kv, (B, 16, config.latent_dim))


def test_cache_accounting_matches_the_real_cache_arrays():
    for overrides in (dict(), dict(kv_heads=2), dict(kv_heads=1), dict(attention="mla", latent_dim=10, rope_dim=4)):
        config = Config(**{**SMALL, **overrides})
        cache = TransformerLM(config, rngs=nnx.Rngs(0)).init_cache(3, max_length=7)
        buffers = [leaf for layer in cache for leaf in layer[:2]]  # k, v or c_kv, k_rope; not lengths
        measured = sum(leaf.nbytes for leaf in buffers) / (3 * 7 * config.layers)
        assert measured == cache_bytes_per_token(config) == 4 * cache_elements_per_token(config)
    assert cache_elements_per_token(Config(**SMALL)) == 2 * 4 * 6  # MHA: 2 H D
    assert cache_elements_per_token(Config(**{**SMALL, "attention": "mla", "latent_dim": 10, "rope_dim": 4})) == 14


def test_ragged_prompts_decode_like_each_prompt_alone():
    model = TransformerLM(Config(**{**SMALL, "kv_heads": 2}), rngs=nnx.Rngs(2))
    params, full, cached = jitted(model)
    lengths = jnp.array([3, 6])
    tokens = tokens_for(2, 9, seed=3)
    padded = tokens[:, :6].at[0, 3:].set(0)
    cache = model.init_cache(2, max_length=12)
    logits, cache = cached(params, padded, cache, lengths)
    np.testing.assert_array_equal(cache[0].lengths, [3, 6])
    follow = [tokens[0, 3:6], tokens[1, 6:9]]  # three more tokens for each row
    decoded = []
    for step in range(3):
        step_logits, cache = cached(params, jnp.stack([follow[0][step], follow[1][step]])[:, None], cache)
        decoded.append(step_logits[:, 0])
    for row, length in enumerate([3, 6]):
        sequence = jnp.concatenate([tokens[row, :length], follow[row]])[None]
        expected = full(params, sequence)[0]
        chex.assert_trees_all_close(logits[row, :length], expected[:length], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(jnp.stack([d[row] for d in decoded]), expected[length:], rtol=1e-5, atol=1e-5)


def test_logits_at_computes_only_the_rows_asked_for():
    model = TransformerLM(Config(**{**SMALL, "kv_heads": 2, "final_softcap": 3.0}), rngs=nnx.Rngs(4))
    params, full, cached = jitted(model)
    tokens = tokens_for(2, 9, seed=5)
    at = jnp.array([[8, 0], [3, 3]])
    every = full(params, tokens)  # [B, T, V]
    some = nnx.jit(lambda model, tokens, at: model(tokens, logits_at=at))(model, tokens, at)  # [B, 2, V]
    chex.assert_trees_all_close(some, jnp.take_along_axis(every, at[..., None], axis=1), rtol=1e-6, atol=1e-6)
    last, _ = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache, num_new=jnp.array([9, 4]),
                                                         logits_at=jnp.array([[8], [3]])))(
        model, tokens, model.init_cache(2, max_length=9))  # [B, 1, V]: each row's last real token
    row_alone = full(params, tokens[1:, :4])[0, 3]
    chex.assert_trees_all_close(last[:, 0], jnp.stack([every[0, 8], row_alone]), rtol=1e-5, atol=1e-5)


def test_decode_step_traces_once_over_64_tokens():
    model = TransformerLM(Config(**{**SMALL, "max_length": 80}), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    step = jax.jit(chex.assert_max_traces(make_decode_step(graphdef), n=1))
    cache = model.init_cache(1, max_length=70)
    token = jnp.array([5], jnp.int32)
    for _ in range(64):
        logits, cache = step(params, token, cache)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    np.testing.assert_array_equal(cache[0].lengths, [64])
    chex.clear_trace_counter()


def test_bad_configs_and_inputs():
    assert Config is TransformerConfig  # the first releases' name
    assert TransformerConfig(heads=6).kv_heads == 6  # unset: MHA
    with pytest.raises(ValueError, match="heads=6 must be a positive multiple of kv_heads=4"):
        Config(heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="positions must be one of"):
        Config(positions="alibi")
    with pytest.raises(ValueError, match="RoPE rotates pairs of dimensions: head_dim must be even, got 5"):
        Config(head_dim=5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention="mla", window=16), "attention='mla' would ignore window=16"),
        (dict(attention="mla", heads=8, kv_heads=2), "attention='mla' would ignore kv_heads=2"),
        (dict(query_latent_dim=32), "query_latent_dim=32 is a width of MLA; attention='standard' would ignore it"),
        (dict(latent_dim=64), "latent_dim=64 is a width of MLA; attention='standard' would ignore it"),
        (dict(rope_dim=16), "rope_dim=16 is a width of MLA; attention='standard' would ignore it"),
        (dict(attention="mla", positions="learned"), "positions='learned' would add a second encoding"),
        (dict(attention="mla", positions="sinusoidal"), "positions='sinusoidal' would add a second encoding"),
        (dict(attention="mla", rope_dim=5), "rope_dim must be even"),
    ],
)
def test_configs_that_would_be_silently_ignored_are_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**overrides)


def test_norm_epsilon_reaches_mla_latent_norms():
    config = dict(SMALL, attention="mla", latent_dim=10, rope_dim=4, query_latent_dim=8)
    assert TransformerConfig(attention="mla").latent_dim == 64  # MLA's default widths, set once
    tokens = tokens_for(1, 7)
    small, large = (TransformerLM(Config(**config, norm_epsilon=eps), rngs=nnx.Rngs(4)) for eps in (1e-6, 10.0))
    for model in (small, large):
        assert model.blocks[0].attn.settings.epsilon == model.config.norm_epsilon
    # With a huge epsilon the latents shrink by about sqrt(mean(x^2) / 10): the logits change.
    assert float(jnp.max(jnp.abs(small(tokens) - large(tokens)))) > 1e-3


def test_flash_kernel_serves_mla_models():
    config = dict(SMALL, attention="mla", latent_dim=10, rope_dim=4, query_latent_dim=8)
    dense = TransformerLM(Config(**config), rngs=nnx.Rngs(4))
    flash = TransformerLM(Config(**config, attention_kernel="flash"), rngs=nnx.Rngs(4))
    tokens = tokens_for(2, 19)
    chex.assert_trees_all_close(jax.jit(flash)(tokens), jax.jit(dense)(tokens), rtol=1e-5, atol=1e-5)
    model = TransformerLM(Config(**SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="33 tokens exceed the context length max_length=32"):
        model(tokens_for(1, 33))
    learned = TransformerLM(Config(**{**SMALL, "positions": "learned"}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="a cache of 40 tokens exceeds the context max_length=32"):
        learned.init_cache(1, max_length=40)


def test_flash_kernel_model_equals_dense_model():
    dense = TransformerLM(Config(**{**SMALL, "kv_heads": 2}), rngs=nnx.Rngs(4))
    flash = TransformerLM(Config(**{**SMALL, "kv_heads": 2, "attention_kernel": "flash"}), rngs=nnx.Rngs(4))
    tokens = tokens_for(2, 19)
    chex.assert_trees_all_close(jax.jit(flash)(tokens), jax.jit(dense)(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        Config(attention_kernel="triton")


def test_blocks_wire_their_norms_as_their_models_do():
    # Each placement written out with the block's own sublayers: pre (Llama), post (OLMo 2),
    # sandwich (Gemma 2/3) and the parallel residual (GPT-NeoX).
    from jaxattn.functional import AttentionContext
    from jaxattn.nn import TransformerBlock

    x = jax.random.normal(jax.random.key(0), (2, 5, 24))
    context = AttentionContext.for_tokens(5)
    for placement, parallel in (("pre", False), ("post", False), ("sandwich", False), ("pre", True)):
        config = Config(**{**SMALL, "norm_placement": placement, "parallel_residual": parallel})
        block = TransformerBlock(config, rngs=nnx.Rngs(1))
        for norm in (block.attn_norm, block.mlp_norm, block.attn_out_norm, block.mlp_out_norm):
            if norm is not None:  # norms start at 1: give them values, so that a misplaced one shows
                norm.scale[...] = 1 + jax.random.normal(jax.random.key(len(placement)), norm.scale.shape)
        attn = lambda h: block.attn(h, context=context)  # noqa: E731
        if parallel:
            expected = x + attn(block.attn_norm(x)) + block.mlp(block.mlp_norm(x))
        elif placement == "pre":
            h = x + attn(block.attn_norm(x))
            expected = h + block.mlp(block.mlp_norm(h))
        elif placement == "post":
            h = x + block.attn_out_norm(attn(x))
            expected = h + block.mlp_out_norm(block.mlp(h))
        else:
            h = x + block.attn_out_norm(attn(block.attn_norm(x)))
            expected = h + block.mlp_out_norm(block.mlp(block.mlp_norm(h)))
        chex.assert_trees_all_close(block(x, context), expected, rtol=1e-6, atol=1e-6)


def test_final_softcap_and_embedding_scale():
    tokens = tokens_for(2, 7)
    plain = TransformerLM(Config(**SMALL), rngs=nnx.Rngs(3))
    capped = TransformerLM(Config(**SMALL, final_softcap=0.05), rngs=nnx.Rngs(3))
    np.testing.assert_allclose(capped(tokens), 0.05 * np.tanh(np.asarray(plain(tokens)) / 0.05), rtol=1e-5, atol=1e-7)
    # Gemma's sqrt(C): the same model with the embedding table scaled by hand, and untied so the
    # head keeps the original table, gives the same logits.
    untied = dict(SMALL, tied_embeddings=False)
    scaled = TransformerLM(Config(**untied, embed_scale=True), rngs=nnx.Rngs(3))
    by_hand = TransformerLM(Config(**untied), rngs=nnx.Rngs(3))
    by_hand.embed.embedding[...] = by_hand.embed.embedding[...] * np.sqrt(24.0)
    chex.assert_trees_all_close(scaled(tokens), by_hand(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_types=("local", "global")), "layer_types has local layers: set window"),
        (dict(layer_types=("global", "global"), window=4), "window=4 would be ignored: layer_types has no local"),
        (dict(layer_types=("global",)), "layer_types must give each of the 2 layers"),
        (dict(local_rope_theta=10.0), "local_rope_theta=10.0 would be ignored: no layer is local"),
        (dict(nope_layers=(2,)), r"nope_layers must be distinct layers in \[0, 2\)"),
        (dict(positions="learned", nope_layers=(1,)), "nope_layers=.* shapes RoPE; positions='learned' would ignore it"),
        (dict(rotary_fraction=0.1), "rotary_fraction=0.1 of head_dim=6 must rotate at least one pair"),
        (dict(qk_norm="layer"), "qk_norm must be 'head', 'projection' or None"),
        (dict(norm_placement="post", parallel_residual=True), "parallel_residual .* takes norm_placement='pre'"),
        (dict(attention="mla", attention_sinks=True), "attention='mla' would ignore attention_sinks=True"),
        (dict(attention="mla", qk_norm="head"), "attention='mla' would ignore qk_norm='head'"),
        (dict(attention_softcap=0), "attention_softcap must be a number > 0"),
    ],
)
def test_todays_settings_that_would_be_ignored_or_cannot_work_are_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**SMALL, **overrides})
