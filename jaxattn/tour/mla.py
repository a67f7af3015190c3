"""Step 11: multi-head latent attention (DeepSeek-V2): one latent cached per token, and the
absorbed path that attends over it directly."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import viz
from jaxattn.mathml import block, frac, i, n, o, paren, row, sub, subsup, sup, t

from jaxattn.tour.page import heading, show


def step_latent_attention(say, text: str, *, seed: int, out: Path):
    from jaxattn.functional import kv_cache_elements_per_token, latent_cache_elements_per_token
    from jaxattn.functional.mla import mla_latents, mla_queries
    from jaxattn.lm.tokenizer import encode
    from jaxattn.nn import TransformerConfig, TransformerLM

    heading(say, "Step 11. Multi-head latent attention (DeepSeek-V2)")
    H, D, L, R = 128, 128, 512, 64
    mha = kv_cache_elements_per_token(kv_heads=H, head_dim=D)
    mla = latent_cache_elements_per_token(latent_dim=L, rope_dim=R)
    say("The KV cache grows with every token, and with H heads it stores 2·H·D numbers per")
    say("token and layer. MLA stores one compressed latent c_kv (width L) and one shared")
    say("RoPE key k_r (width R) instead, and rebuilds keys and values from them.")
    say(f"At DeepSeek-V2's sizes (H={H}, D={D}, L={L}, R={R}), per token and layer:")
    say(f"  MHA caches 2·H·D = {mha:,} numbers;  MLA caches L + R = {mla:,}  ({mla / mha:.1%} of MHA).")
    say("The paper's headline '93.3% smaller KV cache' is not this ratio. It compares DeepSeek-V2")
    say("(60 layers of L + R = 576 numbers, deployed with its cache quantised to about 6 bits a number)")
    say("with DeepSeek 67B, which already used GQA (95 layers, 8 key/value heads of width 128, 16-bit")
    say("numbers). Per token, over all layers:")
    v2_numbers, v2_bits, old_numbers, old_bits = 60 * mla, 6, 95 * kv_cache_elements_per_token(kv_heads=8, head_dim=128), 16
    v2_bytes, old_bytes = v2_numbers * v2_bits // 8, old_numbers * old_bits // 8
    say.formula(f"DeepSeek 67B: 95 x 2 x 8 x 128 = {old_numbers:,} numbers x 16 bits = {old_bytes:,} bytes",
                block(t("DeepSeek 67B: "), n(95), o("×"), n(2), o("×"), n(8), o("×"), n(128), o("="), n(f"{old_numbers:,}"),
                      t(" numbers × 16 bits = "), n(f"{old_bytes:,}"), t(" bytes")))
    say.formula(f"DeepSeek-V2: 60 x (512 + 64) = {v2_numbers:,} numbers x 6 bits = {v2_bytes:,} bytes",
                block(t("DeepSeek-V2: "), n(60), o("×"), paren(n(512), o("+"), n(64)), o("="), n(f"{v2_numbers:,}"),
                      t(" numbers × 6 bits = "), n(f"{v2_bytes:,}"), t(" bytes")))
    say.formula(f"{v2_bytes:,} / {old_bytes:,} = {v2_bytes / old_bytes:.1%}: {1 - v2_bytes / old_bytes:.1%} smaller",
                block(frac(n(f"{v2_bytes:,}"), n(f"{old_bytes:,}")), o("="), n(f"{v2_bytes / old_bytes:.1%}"),
                      t(f": {1 - v2_bytes / old_bytes:.1%} smaller")))
    say(f"The numbers alone shrink by {1 - v2_numbers / old_numbers:.0%}; the rest is the 6-bit quantisation.")
    say("Why RoPE is kept out of the latent: the trick that makes MLA fast, weight absorption (below),")
    say("merges W_uk into the query. Vectors are rows here, as in the code (x W): q_c k_cᵀ =")
    say("c_q W_uq (c_kv W_uk)ᵀ = c_q (W_uq W_ukᵀ) c_kvᵀ needs W_uq and W_uk only as one product. RoPE")
    say("rotates a query at position t by R_t and a key at position s by R_s (x R_t), and the product")
    say("of the two rotations sits between the weights, different for every pair of positions:")
    say.formula("(c_q W_uq R_t)(c_kv W_uk R_s)ᵀ = c_q W_uq R_(t-s) W_ukᵀ c_kvᵀ",
                block(paren(sub(i("c"), i("q")), sub(i("W"), t("uq")), sub(i("R"), i("t"))),
                      sup(paren(sub(i("c"), t("kv")), sub(i("W"), t("uk")), sub(i("R"), i("s"))), o("⊤")), o("="),
                      sub(i("c"), i("q")), sub(i("W"), t("uq")), sub(i("R"), row(i("t"), o("−"), i("s"))),
                      subsup(i("W"), t("uk"), o("⊤")), subsup(i("c"), t("kv"), o("⊤"))))
    say("so W_uq R_(t-s) W_ukᵀ cannot be computed once. MLA therefore rotates only a separate, small")
    say("part of each query and key (q_r, and one k_r shared by every head) and leaves c_kv unrotated:")
    say.formula("score = q_c . k_c + q_r . k_r  (k_c from the unrotated latent, absorbable)",
                block(t("score"), o("="), sub(i("q"), i("c")), o("·"), sub(i("k"), i("c")), o("+"), sub(i("q"), i("r")),
                      o("·"), sub(i("k"), i("r"))))
    config = TransformerConfig(width=64, layers=2, heads=4, head_dim=16, mlp_hidden=128, max_length=64,
                               attention="mla", latent_dim=24, rope_dim=8, query_latent_dim=32)
    model = TransformerLM(config, rngs=nnx.Rngs(seed))
    tokens = jnp.asarray(encode(text))[None]  # [1, T]
    graphdef, params = nnx.split(model)
    naive = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)[0, -1]  # [V]
    step = jax.jit(lambda p, t, c: nnx.merge(graphdef, p)(t, cache=c))
    logits, cache = step(params, tokens[:, :-1], model.init_cache(1, max_length=tokens.shape[1]))
    absorbed, cache = step(params, tokens[:, -1:], cache)  # the last token decodes through the absorbed path
    difference = float(jnp.max(jnp.abs(absorbed[0, -1] - naive)))
    say("A small MLA model (random, untrained weights, H=4, D=16, L=24, R=8): next-token logits")
    say(f"after {text!r} from the full pass (mla_naive: keys and values decompressed per head) and")
    say("from decoding the last token (mla_absorbed: attention directly over the cached latents)")
    say(f"differ by {difference:.1e}. jaxattn decodes through the absorbed path (one token's query against")
    say("the whole cache: reading L + R numbers per cached token beats decompressing every key) and trains")
    say("and prefills through the naive one (T queries at once: decompressing once per token is cheaper")
    say("than the larger absorbed products for every query);")
    say(f"the cache holds {cache[0].c_kv.shape[-1] + cache[0].k_rope.shape[-1]} numbers per token and layer.")
    layer = model.blocks[0].attn
    p = layer.params()
    h = model.embed(tokens)  # [B, T, C], the layer's input shape
    positions = jnp.arange(tokens.shape[1])
    q_c, q_r = mla_queries(p, h, positions, layer.settings)
    c_kv, k_r = mla_latents(p, h, positions, layer.settings)
    B, T, C = h.shape

    def shape(*dims):
        return "[" + ", ".join(dims) + "]"

    sizes = dict(B=B, T=T, S=T, C=C, H=layer.w_uk.shape[1], D=q_c.shape[-1], E=layer.w_uv.shape[-1], L=c_kv.shape[-1],
                 R=k_r.shape[-1])
    named = lambda *dims: shape(*(f"{d}={sizes[d]}" for d in dims))  # noqa: E731
    latents = named("B", "S", "L") + " " + named("B", "S", "R")
    flows = {
        "mla_naive: keys and values per head": [
            ("h", named("B", "T", "C"), "input"),
            ("c_kv = h W_dkv,  k_r = RoPE(h W_kr)", latents, "computed"),
            ("k_c = c_kv W_uk,  v_c = c_kv W_uv", named("B", "S", "H", "D") + " x 2", "weight"),
            ("k_c, v_c (an ordinary KV cache: 2·H·D a token)", named("B", "S", "H", "D") + " x 2", "cached"),
            ("softmax([q_c; q_r]·[k_c; k_r] / sqrt(D + R)) v_c", named("B", "T", "H", "E"), "computed"),
            ("u = o W_o", named("B", "T", "C"), "computed")],
        "mla_decompressed: cache the latent, decompress every step": [
            ("h", named("B", "T", "C"), "input"),
            ("c_kv, k_r (a LatentCache: L + R a token)", latents, "cached"),
            ("k_c = c_kv W_uk,  v_c = c_kv W_uv  (the whole cache, every step)", named("B", "S", "H", "D") + " x 2",
             "weight"),
            ("softmax([q_c; q_r]·[k_c; k_r] / sqrt(D + R)) v_c", named("B", "T", "H", "E"), "computed"),
            ("u = o W_o", named("B", "T", "C"), "computed")],
        "mla_absorbed: attend over the latent": [
            ("h", named("B", "T", "C"), "input"),
            ("c_kv, k_r (a LatentCache: L + R a token)", latents, "cached"),
            ("q_lat = q_c W_ukᵀ  (W_uk moves to the query)", named("B", "T", "H", "L"), "weight"),
            ("softmax([q_lat; q_r]·[c_kv; k_r] / sqrt(D + R)) c_kv", named("B", "T", "H", "L"), "computed"),
            ("o = o_lat W_uv  (W_uv moves to the output)", named("B", "T", "H", "E"), "weight"),
            ("u = o W_o", named("B", "T", "C"), "computed")],
    }
    cache_sizes = {"MHA (H=128)": mha, "GQA (K=8)": kv_cache_elements_per_token(kv_heads=8, head_dim=D),
                   "MQA (K=1)": kv_cache_elements_per_token(kv_heads=1, head_dim=D), "MLA (L+R)": mla}
    path = viz.mla_figure(flows, cache_sizes, out / "mla.png")
    show(say, path, "MLA's three paths under their jaxattn names (shapes of this small model), and cache sizes per token")
    return difference, cache_sizes
