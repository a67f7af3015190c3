"""Step 14: attention in today's models: soft-capping, sinks, local and global layers, NoPE,
RoPE scaling."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import viz
from jaxattn.functional import (
    attention_weights,
    rope,
)

from jaxattn.tour.page import heading, random_matrix, show


def step_todays_attention(say, words, head_q, head_k, *, out: Path, seed: int):
    """Soft-capping, learned sinks, local and global layers, NoPE and RoPE scaling: each from
    the library's own functions, with why the models' authors chose it. ``head_q``, ``head_k``
    ``[T, D]``: step 2's head, which the sinks part shows again."""
    from jaxattn.functional import multi_head_attention_weights
    from jaxattn.functional.positions import RopeScaling, rope_frequencies
    from jaxattn.functional.softmax import soft_cap
    from jaxattn.nn import TransformerConfig, TransformerLM

    heading(say, "Step 14. Attention in today's models")
    say("The models people run today keep the attention of steps 2-13 and change a few things in it.")
    say("")
    say("Soft-capping (Gemma 2, arXiv 2408.00118). A logit s becomes cap·tanh(s/cap): nearly s while")
    say("small, never beyond ±cap. Gemma 2 caps attention logits at 50 and the final logits at 30; it")
    say("keeps one runaway score from taking a whole softmax row, which its authors found steadies")
    say("training. The cap comes after the scale and before the mask (a capped mask value would give")
    say("masked keys real weight). QK-norm does the same job another way (ViT-22B, arXiv 2302.05442):")
    say("Qwen3 and Gemma 3 RMS-normalise each query and key head before RoPE, OLMo 2 the whole query")
    say("and key projections (all heads as one vector; jaxattn: qk_norm='head' or 'projection'), so logits")
    say("cannot grow with the weights' norms; Gemma 3 dropped soft-capping for it.")
    cap = 5.0
    raw = np.linspace(-15, 15, 121)
    capped = np.asarray(soft_cap(jnp.asarray(raw, jnp.float32), cap))
    row_logits = np.array([12.0, 6.0, 4.0, 2.0, 0.0])
    q, k = jnp.asarray([[1.0, 0.0]], jnp.float32), jnp.asarray(np.stack([row_logits, np.zeros(5)], 1), jnp.float32)
    plain = np.asarray(attention_weights(q, k, scale=1.0))[0]
    bent = np.asarray(attention_weights(q, k, scale=1.0, logit_softcap=cap))[0]
    say(f"A row with logits {row_logits.tolist()}: the largest takes {plain[0]:.1%} of the weight; capped at")
    say(f"{cap:g}, {bent[0]:.1%}, and the second key gets {bent[1]:.1%} instead of {plain[1]:.1%}.")
    show(say, viz.softcap_figure(raw, capped, row_logits, plain, bent, out / "softcap.png", cap=cap),
         f"the soft-cap curve (cap {cap:g}) and one row's weights without and with it")
    say("")
    say("Learned sinks (gpt-oss, arXiv 2508.10925). Trained models park much attention on the first")
    say("token whatever it says (StreamingLLM, arXiv 2309.17453): a head with nothing to look for still")
    say("has to spend its softmax somewhere. gpt-oss gives each head one learned logit that joins every")
    say("row's denominator, e^sink + Σ e^s, and is then dropped: the head can put weight on nothing.")
    qs, ks = jnp.asarray(head_q)[None, :, None], jnp.asarray(head_k)[None, :, None]  # [1, T, 1, D]: step 3's head
    scores = np.asarray(head_q @ head_k.T) / np.sqrt(head_q.shape[-1])  # [T, T]
    logits = np.where(np.tril(np.ones_like(scores, bool)), scores, -np.inf)
    sink = round(float(np.mean(logits.max(-1))), 1)  # about this head's largest scores, so that it competes with them
    without = np.asarray(multi_head_attention_weights(qs, ks, is_causal=True))[0, 0]
    with_sink = np.asarray(multi_head_attention_weights(qs, ks, is_causal=True, sinks=jnp.array([sink])))[0, 0]
    share = 1 - with_sink.sum(-1)
    say(f"Step 3's causal head over {words}, now with a sink logit of {sink:g} (the mean of its rows' largest")
    say("scores, so that it competes with them): the rows sum to")
    say(f"{', '.join(f'{x:.2f}' for x in with_sink.sum(-1))}; the first token, with one key to see, gives the sink")
    say(f"{share[0]:.0%}. With nothing visible at all the sink takes everything and the output is 0.")
    show(say, viz.sink_figure(without, with_sink, share, words, out / "sinks.png", sink=sink),
         "one head's weights without and with a learned sink, and the share each row gives it")
    say("")
    say("Local and global layers (Mistral 7B; Gemma 2, 1:1 with a 4,096-token window; Gemma 3, 5:1 with")
    say("1,024, arXiv 2503.19786). A local layer sees a sliding window of recent tokens; a global layer")
    say("sees everything. Interleaving them keeps long-range reading at a fraction of the cache: Gemma 3")
    say("found its 5:1 pattern about as good as all-global, and gives its local layers RoPE base 10k and")
    say("its global layers 1M. jaxattn: layer_types, window, local_rope_theta; each global layer gets a")
    say("full cache, each local one a ring buffer of W + chunk - 1 slots, chunk being the most tokens one")
    say("call adds (a prompt's new keys must all be in the buffer while its own queries read them).")
    layers = 24
    common = dict(vocab_size=256, width=512, layers=layers, heads=8, kv_heads=4, head_dim=128, mlp_hidden=1024,
                  max_length=131072, dtype="bfloat16")
    patterns = {"all global (Llama)": (("global",) * layers, None),
                "1:1, window 4,096 (Gemma 2)": (("local", "global") * (layers // 2), 4096),
                "5:1, window 1,024 (Gemma 3)": ((("local",) * 5 + ("global",)) * (layers // 6), 1024)}
    lengths = [1024, 4096, 16384, 65536, 131072]
    curves = {}
    for name, (kinds, window) in patterns.items():
        config = TransformerConfig(**common, layer_types=kinds, window=window)
        model = nnx.eval_shape(lambda config=config: TransformerLM(config, rngs=nnx.Rngs(0)))
        mib = []
        for length in lengths:  # the shapes init_cache allocates (one decode token per call), not the arrays
            cache = jax.eval_shape(lambda length=length: model.init_cache(1, max_length=length, chunk=1))
            mib.append(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)) / 2**20)
        curves[name] = (lengths, mib)
    at = lengths.index(131072)
    say(f"A {layers}-layer model, 4 key/value heads of width 128, bfloat16, decoding a token per call: at 128k")
    say("tokens the cache is " + ", ".join(f"{curves[name][1][at]:,.0f} MiB {name}" for name in patterns) + ".")
    local = TransformerConfig(**dict(common, layers=1), layer_types=("local",), window=1024)
    local_model = nnx.eval_shape(lambda: TransformerLM(local, rngs=nnx.Rngs(0)))
    slots = {chunk: jax.eval_shape(lambda chunk=chunk: local_model.init_cache(1, max_length=131072, chunk=chunk))[0].k.shape[1]
             for chunk in (1, 512, 131072)}
    say(f"The saving needs the prompt to come in chunks: a local layer of window 1,024 holds {slots[1]:,} slots when")
    say(f"tokens come one per call, {slots[512]:,} when a prompt is prefilled 512 tokens per call (generate and the")
    say(f"engine's prefill_chunk do this), and {slots[131072]:,} -- nothing saved -- when a 128k prompt is prefilled in one call.")
    show(say, viz.layer_pattern_figure(patterns, curves, out / "local_global.png"),
         "three layer patterns and the KV cache each needs")
    say("")
    say("NoPE layers (SmolLM3, every 4th layer; Llama 4). A layer without any position encoding still")
    say("knows the order through the causal mask (Kazemnejad et al. 2023, arXiv 2305.19466), and with")
    say("no rotation its scores do not fade or wobble with distance, which helps with contexts longer than")
    say("training saw. jaxattn: nope_layers. Below, one query and one key at every distance.")
    D = 64
    qv, kv = np.asarray(random_matrix(seed + 30, (D,))), np.asarray(random_matrix(seed + 31, (D,)))
    distances = np.arange(0, 256)
    rotated_q = np.asarray(rope(jnp.broadcast_to(jnp.asarray(qv), (len(distances), D)), jnp.asarray(distances)))
    rotated_k = np.asarray(rope(jnp.asarray(kv)[None], jnp.zeros(1, jnp.int32)))[0]
    scores = {"RoPE (θ = 10,000)": rotated_q @ rotated_k, "NoPE": np.full(len(distances), qv @ kv)}
    show(say, viz.nope_rope_figure(distances, scores, out / "nope.png"),
         "q·k against the distance, with RoPE and without")
    say("")
    say("RoPE scaling. Past its trained context a model meets rotations it never saw. Linear scaling")
    say("(Chen et al. 2023, arXiv 2306.15595) slows every frequency by the factor; NTK-aware 'dynamic'")
    say("scaling raises the base once the text is longer; Llama 3.1 and YaRN (arXiv 2309.00071) leave")
    say("the fast frequencies alone, which resolve nearby tokens, and slow the slow ones, blending in")
    say("between. Llama 3.1's settings: factor 8, original context 8,192, low_freq_factor 1 and")
    say("high_freq_factor 4: a wavelength longer than 8,192 / 1 = 8,192 tokens is slowed 8x, one shorter")
    say("than 8,192 / 4 = 2,048 is kept, and those between are blended -- so the curve leaves the")
    say("original at a quarter of the context, not at the context. YaRN also sharpens the softmax a")
    say("little (cos and sin times 0.1·ln(factor) + 1). LongRoPE (Phi-3) learns one factor per frequency.")
    R, theta, context = 128, 500000.0, 8192
    kinds = {"none": None, "linear x4": RopeScaling("linear", factor=4.0),
             "dynamic (NTK), at 4x": RopeScaling("dynamic", factor=4.0, max_length=context),
             "llama3 x8 (Llama 3.1)": RopeScaling("llama3", factor=8.0, original_max_length=context,
                                                  low_freq_factor=1.0, high_freq_factor=4.0),
             "yarn x4": RopeScaling("yarn", factor=4.0, original_max_length=context)}
    wavelengths = {}
    for name, scaling in kinds.items():
        frequencies, factor = rope_frequencies(R, theta, scaling, seq_len=4 * context)
        wavelengths[name] = 2 * np.pi / np.asarray(frequencies, np.float64)
    kept = int(np.sum(np.isclose(wavelengths["llama3 x8 (Llama 3.1)"], wavelengths["none"])))
    slowed = int(np.sum(np.isclose(wavelengths["llama3 x8 (Llama 3.1)"], 8 * wavelengths["none"])))
    say(f"R = {R}, θ = {theta:,.0f}, trained on {context:,} tokens: llama3 keeps {kept} of {R // 2} frequencies as")
    say(f"they were, slows {slowed} by 8x and blends {R // 2 - kept - slowed}; linear slows all of them.")
    show(say, viz.rope_scaling_figure(wavelengths, context, out / "rope_scaling.png", band=(context / 4, context)),
         "every RoPE wavelength before and after scaling: linear, dynamic and YaRN to 4x the context, Llama 3.1's x8")
    return {"softcap": (plain, bent), "sinks": (without, with_sink), "cache_mib": curves, "wavelengths": wavelengths,
            "nope": scores}
