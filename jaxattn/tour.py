"""The guided tour: one sentence through every step of attention.

``jaxattn tour`` runs ``run_tour``. Each step is a function that prints what it does
and returns what it computed, so the tests can check the numbers the learner sees.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import viz
from jaxattn.functional import attention, attention_weights, causal_mask, multi_head_attention, sinusoidal_positions

DEFAULT_TEXT = "The next day is bright"


def format_matrix(matrix, row_labels, col_labels, *, fmt="{:6.2f}") -> str:
    """A small matrix as an aligned text table with row and column labels."""
    matrix = np.asarray(matrix)
    width = max(6, *(len(label) for label in col_labels))
    label_width = max(len(label) for label in row_labels)
    lines = [" " * label_width + " " + " ".join(label.rjust(width) for label in col_labels)]
    for label, row in zip(row_labels, matrix):
        cells = " ".join(fmt.format(value).rjust(width) for value in row)
        lines.append(label.rjust(label_width) + " " + cells)
    return "\n".join(lines)


def _heading(say, title: str) -> None:
    say("")
    say(title)
    say("-" * len(title))


def _random_matrix(seed: int, shape):
    """Seeded standard-normal numbers (NumPy: the tour needs no compiled sampler)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def embed_words(text: str, *, width: int, seed: int):
    """Word tokens, a seeded random embedding table and sinusoidal positions.

    Returns ``(words, x [T, C])`` with ``x = embedding[token] + sinusoidal_positions``.
    """
    words = text.split()
    if not words:
        raise ValueError("the tour needs a text with at least one word")
    vocabulary = sorted(set(words))
    token_ids = jnp.array([vocabulary.index(word) for word in words])
    table = _random_matrix(seed, (len(vocabulary), width)) / np.sqrt(width)  # [V, C]
    x = table[token_ids] + sinusoidal_positions(len(words), width)  # [T, C]
    return words, vocabulary, token_ids, x


def step_tokens(say, text: str, *, width: int, seed: int):
    _heading(say, "Step 1. Tokens and embeddings")
    words, vocabulary, token_ids, x = embed_words(text, width=width, seed=seed)
    say(f"Text: {text!r}")
    say(f"Tokenized into words (split on spaces): {words}")
    say(f"Token ids (index in the sorted vocabulary {vocabulary}): {token_ids.tolist()}")
    say("Each token becomes a row of a seeded random embedding table plus a sinusoidal")
    say(f"position vector, so x has shape [T, C] = {list(x.shape)}.")
    return words, x


def step_self_attention(say, words, x, *, head_width: int, seed: int, out: Path):
    _heading(say, "Step 2. Self-attention, one head")
    C = x.shape[1]
    wq, wk, wv = _random_matrix(seed + 1, (3, C, head_width)) / np.sqrt(C)  # [C, D] each
    q, k, v = x @ wq, x @ wk, x @ wv  # [T, D]
    say(f"Three learned matrices [C, D] = [{C}, {head_width}] project x into")
    say(f"queries Q {list(q.shape)}, keys K {list(k.shape)} and values V {list(v.shape)}.")
    scores = (q @ k.T) / np.sqrt(head_width)  # [T, S]
    say("Scores Q K^T / sqrt(D): how well each query (row) matches each key (column):")
    say(format_matrix(scores, words, words))
    weights = attention_weights(q, k)  # [T, S]
    say("Softmax turns each row into weights that are positive and sum to 1:")
    say(format_matrix(weights, words, words))
    output = attention(q, k, v)  # [T, D]
    say(f"The output row of each token is its weighted sum of value rows: {list(output.shape)}.")
    path = viz.attention_heatmap(weights, words, words, out / "self_attention.png", title="Self-attention weights (one head)")
    say(f"Heatmap: {path}")
    return q, k, v, weights


def step_causal(say, words, q, k, *, out: Path):
    _heading(say, "Step 3. Causal attention")
    T = len(words)
    positions = jnp.arange(T)
    mask = causal_mask(positions, positions)  # [T, T]
    say("A language model predicts the next token, so a token may only look at itself")
    say("and the tokens before it. The causal mask (1 = may attend):")
    say(format_matrix(mask.astype(int), words, words, fmt="{:d}"))
    weights = attention_weights(q, k, mask=mask)  # [T, T]
    say("Masked scores are pushed to a large negative number before the softmax, so")
    say("their weight is exactly zero and every row still sums to 1:")
    say(format_matrix(weights, words, words))
    say(f"{words[0]!r} can only attend to itself; {words[-1]!r} sees the whole sentence.")
    path = viz.attention_heatmap(weights, words, words, out / "causal_attention.png", title="Causal attention weights (one head)")
    say(f"Heatmap: {path}")
    return mask, weights


def step_multi_head(say, words, x, *, heads: int, kv_heads: int, head_width: int, seed: int):
    _heading(say, "Step 4. Multi-head attention")
    C = x.shape[1]
    wq = _random_matrix(seed + 2, (C, heads, head_width)) / np.sqrt(C)  # [C, H, D]
    wk = _random_matrix(seed + 3, (C, kv_heads, head_width)) / np.sqrt(C)  # [C, K, D]
    wv = _random_matrix(seed + 4, (C, kv_heads, head_width)) / np.sqrt(C)  # [C, K, D]
    q = jnp.einsum("tc,chd->thd", x, wq)[None]  # [1, T, H, D]
    k = jnp.einsum("tc,ckd->tkd", x, wk)[None]  # [1, T, K, D]
    v = jnp.einsum("tc,ckd->tkd", x, wv)[None]  # [1, T, K, D]
    group = heads // kv_heads
    say(f"H = {heads} query heads each run the same one-head kernel on their own projection;")
    say(f"here K = {kv_heads} key/value heads, so every {group} query heads share one K/V head (GQA).")
    say(f"Shapes: q {list(q.shape)} = [B, T, H, D], k and v {list(k.shape)} = [B, S, K, D].")
    together = multi_head_attention(q, k, v, is_causal=True)  # [1, T, H, D]
    mask = causal_mask(jnp.arange(len(words)), jnp.arange(len(words)))
    one_by_one = jnp.stack(
        [attention(q[0, :, h], k[0, :, h // group], v[0, :, h // group], mask=mask) for h in range(heads)],
        axis=1,
    )  # [T, H, D]
    difference = float(jnp.max(jnp.abs(together[0] - one_by_one)))
    say("multi_head_attention is the one-head kernel jax.vmap-ed over heads and batch.")
    say(f"Largest difference from running the kernel head by head: {difference:.2e}")
    for h in range(heads):
        weights = attention_weights(q[0, :, h], k[0, :, h // group], mask=mask)
        focus = words[int(jnp.argmax(weights[-1]))]
        say(f"  head {h} (K/V head {h // group}): {words[-1]!r} attends most to {focus!r}")
    say(f"The heads' outputs are concatenated to [T, H*D] = [{len(words)}, {heads * head_width}]")
    say("and projected back to the model width C.")
    return together, one_by_one


def tour_model(say, checkpoint, out: Path):
    """The trained model the last steps use: ``checkpoint``, else ``runs/default`` if it
    holds a run, else a small model trained now (under two minutes) into ``out/model``."""
    from jaxattn.lm.checkpoint import RunFolder

    if checkpoint is not None:
        return RunFolder(checkpoint).load_model(), Path(checkpoint)
    for candidate in (Path("runs/default"), out / "model"):
        run = RunFolder(candidate)
        if run.holds_run() and run.latest_step() is not None:
            return run.load_model(), candidate
    from jaxattn.lm.data import load_corpus
    from jaxattn.lm.train import TrainConfig, default_model_config, train

    say("No trained model found (jaxattn train writes one to runs/default), so the tour trains a")
    say(f"small one now, in under two minutes, into {out / 'model'}; the next tour reuses it.")
    quick = TrainConfig(steps=110, batch_size=32, seq_len=128, learning_rate=4e-3, warmup_steps=20,
                        eval_every=1000, checkpoint_every=1000)
    train(default_model_config(), quick, load_corpus(), RunFolder(out / "model"), say=say)
    return RunFolder(out / "model").load_model(), out / "model"


def _timed(fn):
    jax.block_until_ready(fn())  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def step_kv_cache(say, model, text: str):
    from jaxattn.lm.generate import generate
    from jaxattn.lm.tokenizer import encode

    _heading(say, "Step 5. The KV cache")
    tokens = jnp.asarray(encode(text))[None]  # [1, T]
    T = tokens.shape[1]
    say(f"The language model reads bytes: {text!r} is T = {T} tokens. To generate, it")
    say("predicts one token, appends it, and predicts again. Without a cache every step")
    say("recomputes the keys and values of all earlier tokens; with a KV cache each step")
    say("computes them only for the new token and reads the rest from the cache.")
    graphdef, params = nnx.split(model)
    full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)  # [1, T, V]
    step = jax.jit(lambda p, t, c: nnx.merge(graphdef, p)(t, cache=c))
    cache = model.init_cache(1, max_length=T)
    decoded = []
    for t in range(T):
        logits, cache = step(params, tokens[:, t : t + 1], cache)
        decoded.append(logits)
    difference = float(jnp.max(jnp.abs(jnp.concatenate(decoded, axis=1) - full)))
    say("Decoding the sentence token by token with the cache reproduces the full pass's")
    say(f"logits: largest difference {difference:.1e}.")
    cache_layer = cache[0]
    say(f"Cache per layer: k and v of shape {list(cache_layer.k.shape)} = [B, S_max, K, D], plus lengths {cache_layer.lengths.tolist()}.")
    new = 200
    prompt = [encode(text)]
    with_cache = _timed(lambda: generate(model, prompt, max_new_tokens=new))
    without = _timed(lambda: generate(model, prompt, max_new_tokens=new, use_cache=False))
    say(f"Generating {new} tokens: {new / with_cache:,.0f} tokens/s with the cache, "
        f"{new / without:,.0f} tokens/s recomputing everything ({without / with_cache:.1f}x slower).")
    return difference, with_cache, without


def step_next_token(say, model, text: str, source: Path):
    from jaxattn.lm.generate import Sampling, generate
    from jaxattn.lm.tokenizer import decode, encode, token_label

    _heading(say, "Step 6. The next token")
    tokens = jnp.asarray(encode(text))[None]
    probabilities = jax.nn.softmax(jax.jit(model)(tokens)[0, -1])  # [V]
    top = jnp.argsort(-probabilities)[:5]
    say(f"The trained model ({source}) after {text!r}, top 5 next bytes:")
    for rank, token in enumerate(top.tolist(), start=1):
        say(f"  {rank}. {token_label(token):6} {float(probabilities[token]):6.1%}")
    continuation = generate(model, [encode(text)], max_new_tokens=80, sampling=Sampling(temperature=0.7, top_p=0.95))
    say(f"A sampled continuation (temperature 0.7): {text + decode(continuation[0])!r}")
    return [(int(t), float(probabilities[t])) for t in top.tolist()]


def step_latent_attention(say, text: str, *, seed: int):
    from jaxattn.functional import kv_cache_elements_per_token, latent_cache_elements_per_token
    from jaxattn.lm.tokenizer import encode
    from jaxattn.nn import Config, TransformerLM

    _heading(say, "Step 7. Multi-head latent attention (DeepSeek-V2)")
    H, D, L, R = 128, 128, 512, 64
    mha = kv_cache_elements_per_token(kv_heads=H, head_dim=D)
    mla = latent_cache_elements_per_token(latent_dim=L, rope_dim=R)
    say("The KV cache grows with every token, and with H heads it stores 2·H·D numbers per")
    say("token and layer. MLA stores one compressed latent c_kv (width L) and one shared")
    say("RoPE key k_r (width R) instead, and rebuilds keys and values from them.")
    say(f"At DeepSeek-V2's sizes (H={H}, D={D}, L={L}, R={R}), per token and layer:")
    say(f"  MHA caches 2·H·D = {mha:,} numbers;  MLA caches L + R = {mla:,}  ({mla / mha:.1%} of MHA).")
    say("The paper's headline '93.3% smaller KV cache' is not this ratio: it compares")
    say("DeepSeek-V2 (60 layers, 576 numbers per layer, deployed with the cache quantised to")
    say("about 6 bits a number) with DeepSeek 67B, which already used GQA (95 layers, 8 K/V")
    say("heads of width 128: 2,048 numbers per layer, 16-bit). Numbers alone: 34,560 vs")
    say("194,560 per token (82% smaller); with 6 vs 16 bits: 6.7% of the bytes, i.e. 93.3% less.")
    config = Config(width=64, layers=2, heads=4, head_dim=16, mlp_hidden=128, max_length=64,
                    attention="mla", latent_dim=24, rope_dim=8, query_latent_dim=32)
    model = TransformerLM(config, rngs=nnx.Rngs(seed))
    tokens = jnp.asarray(encode(text))[None]  # [1, T]
    graphdef, params = nnx.split(model)
    naive = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)[0, -1]  # [V]
    step = jax.jit(lambda p, t, c: nnx.merge(graphdef, p)(t, cache=c))
    logits, cache = step(params, tokens[:, :-1], model.init_cache(1, max_length=tokens.shape[1]))
    absorbed, cache = step(params, tokens[:, -1:], cache)  # the last token decodes through the absorbed path
    difference = float(jnp.max(jnp.abs(absorbed[0, -1] - naive)))
    say("A small MLA model (random weights, H=4, D=16, L=24, R=8): next-token logits after")
    say(f"{text!r} from the naive path (keys/values decompressed per head) and from the")
    say(f"absorbed path (attention directly over the cached latents) differ by {difference:.1e};")
    say(f"the cache holds {cache[0].c_kv.shape[-1] + cache[0].k_rope.shape[-1]} numbers per token and layer.")
    return difference


def step_memory(say):
    from jaxattn.functional import flash_attention, multi_head_attention

    _heading(say, "Step 8. Memory-efficient attention")
    say("Dense attention materialises a [T, S] score matrix per head: memory grows with T².")
    say("flash_attention visits keys block by block with an online softmax, so its memory")
    say("grows with T. Compiled temporary memory, B=1, H=8, D=64, float32, causal:")
    say(f"  {'T':>6} {'score matrix':>13} {'dense kernel':>13} {'flash kernel':>13}")
    rows = []
    for T in (1024, 4096, 16384):
        shape = jax.ShapeDtypeStruct((1, T, 8, 64), jnp.float32)

        def temp(kernel):
            fn = jax.jit(lambda q, k, v: kernel(q, k, v, is_causal=True))
            return fn.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

        dense, flash = temp(multi_head_attention), temp(flash_attention)
        scores = 8 * T * T * 4
        rows.append((T, dense, flash))
        say(f"  {T:>6} {scores / 2**20:>10.0f} MiB {dense / 2**20:>9.0f} MiB {flash / 2**20:>9.1f} MiB")
    return rows


def run_tour(text: str = DEFAULT_TEXT, *, out="jaxattn-tour", seed: int = 0, checkpoint=None, say=print) -> dict:
    """Walks ``text`` through attention, step by step; figures go to ``out``.

    Returns the arrays each step computed, keyed by name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"jaxattn tour: how attention inside an LLM works (figures in {out.resolve()})")
    words, x = step_tokens(say, text, width=16, seed=seed)
    q, k, v, weights = step_self_attention(say, words, x, head_width=8, seed=seed, out=out)
    mask, causal_weights = step_causal(say, words, q, k, out=out)
    together, one_by_one = step_multi_head(say, words, x, heads=4, kv_heads=2, head_width=4, seed=seed)
    model, source = tour_model(say, checkpoint, out)
    cache_difference, cached_s, uncached_s = step_kv_cache(say, model, text)
    top5 = step_next_token(say, model, text, source)
    mla_difference = step_latent_attention(say, text, seed=seed)
    memory = step_memory(say)
    say("")
    say(f"Done. Figures are in {out.resolve()}")
    return {
        "cache_difference": cache_difference,
        "mla_difference": mla_difference,
        "memory": memory,
        "top5": top5,
        "words": words,
        "x": x,
        "q": q,
        "k": k,
        "v": v,
        "weights": weights,
        "causal_mask": mask,
        "causal_weights": causal_weights,
        "multi_head": together,
        "one_head_loop": one_by_one,
    }
