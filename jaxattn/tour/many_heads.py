"""Steps 5-6: many heads from one kernel (GQA: query head h reads key/value head h // (H / K)),
and where tokens are: RoPE."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxattn import viz
from jaxattn.mathml import block, i, o, paren, row, sub, subsup, sup
from jaxattn.functional import (
    attention,
    attention_weights,
    causal_mask,
    multi_head_attention,
    rope,
)

from jaxattn.tour.page import heading, random_matrix, show


def step_multi_head(say, words, x, *, heads: int, kv_heads: int, head_width: int, seed: int, out: Path):
    heading(say, "Step 5. Multi-head attention")
    C = x.shape[1]
    wq = random_matrix(seed + 2, (C, heads, head_width)) / np.sqrt(C)  # [C, H, D]
    wk = random_matrix(seed + 3, (C, kv_heads, head_width)) / np.sqrt(C)  # [C, K, D]
    wv = random_matrix(seed + 4, (C, kv_heads, head_width)) / np.sqrt(C)  # [C, K, D]
    q = jnp.einsum("tc,chd->thd", x, wq)[None]  # [1, T, H, D]
    k = jnp.einsum("tc,ckd->tkd", x, wk)[None]  # [1, T, K, D]
    v = jnp.einsum("tc,ckd->tkd", x, wv)[None]  # [1, T, K, D]
    group = heads // kv_heads
    say(f"H = {heads} query heads each run the same one-head kernel on their own projection;")
    say(f"here K = {kv_heads} key/value heads, so every G = H / K = {group} query heads share one K/V head (GQA):")
    say(f"query head h reads key/value head h // G (heads " +
        "; ".join(f"{', '.join(str(h) for h in range(g * group, (g + 1) * group))} read {g}" for g in range(kv_heads)) +
        "). K = H is multi-head attention, K = 1 multi-query attention.")
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
    head_weights = jnp.stack([attention_weights(q[0, :, h], k[0, :, h // group], mask=mask) for h in range(heads)])
    for h in range(heads):
        focus = words[int(jnp.argmax(head_weights[h, -1]))]
        say(f"  head {h} (K/V head {h // group}): {words[-1]!r} attends most to {focus!r}")
    say(f"The heads' outputs are concatenated to [T, H*D] = [{len(words)}, {heads * head_width}]")
    say("and projected back to the model width C.")
    show(say, viz.head_grouping_figure(head_weights, words, out / "multi_head.png", kv_heads=kv_heads),
         "every head's weights, and which query heads share a key/value head")
    return together, one_by_one, head_weights


def step_positions(say, *, out: Path, D: int = 16, N: int = 16, pair: int = 1, seed: int = 5):
    heading(say, "Step 6. Where tokens are: RoPE")
    say("Attention by itself does not know the order of the tokens: shuffle keys and values")
    say("together and the output does not change. Step 1 added a position vector to each")
    say("embedding; most LLMs today rotate the queries and keys instead (RoPE, Su et al. 2021).")
    say(f"The D = {D} numbers of a head form D/2 pairs; pair i of the token at position m is")
    say("rotated by the angle m·θ_i, θ_i = 10000^(-2i/D): fast turns for the first pairs, slow for")
    say("the last. Rotating q by m·θ and k by n·θ leaves q·k depending only on m − n:")
    say.formula("(R_m q) . (R_n k) = q^T R_m^T R_n k = q^T R_(n-m) k",
                block(paren(sub(i("R"), i("m")), i("q")), o("·"), paren(sub(i("R"), i("n")), i("k")), o("="),
                      sup(i("q"), i("T")), subsup(i("R"), i("m"), i("T")), sub(i("R"), i("n")), i("k"), o("="),
                      sup(i("q"), i("T")), sub(i("R"), row(i("n"), o("−"), i("m"))), i("k")))
    q, k = random_matrix(seed, (D,)), random_matrix(seed + 1, (D,))
    positions = jnp.arange(N)
    rotated = {}
    for style in ("half", "interleaved"):
        rq = rope(jnp.broadcast_to(q, (N, D)), positions, style=style)  # [N, D]: q at every position
        rk = rope(jnp.broadcast_to(k, (N, D)), positions, style=style)
        rotated[style] = np.asarray(rq @ rk.T)  # [m, n]
    a, b = pair, pair + D // 2  # the "half" pairing
    rq_half = rope(jnp.broadcast_to(q, (12, D)), jnp.arange(12), style="half")
    points = np.stack([np.asarray(rq_half[:, a]), np.asarray(rq_half[:, b])], axis=1)  # [12, 2]
    spread = max(float(np.ptp(np.diag(scores, d))) for scores in rotated.values() for d in range(1 - N, N))
    say("The score table over (m, n) is constant along each diagonal (largest spread along one:")
    say(f"{spread:.1e}): the same pair of tokens scores the same wherever it sits.")
    say("Pairings: 'half' pairs dimension i with i + D/2 (GPT-NeoX, Hugging Face Llama, Qwen2,")
    say("Mistral); 'interleaved' pairs 2i with 2i + 1 (GPT-J, the original Llama, DeepSeek).")
    path = viz.rope_figure(points, rotated, out / "rope.png", pair=pair, D=D)
    show(say, path, "one pair of dimensions turning with the position, and q·k over (m, n) for both pairings")
    return {"scores": rotated, "points": points}
