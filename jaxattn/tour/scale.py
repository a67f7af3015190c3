"""Steps 12-13: memory-efficient attention (the blocks a flash kernel visits) and attention
across devices (ring attention, and the zigzag order that balances it)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import viz
from jaxattn.mathml import block, i, o, paren, row, sub, sup, t, under
from jaxattn.functional import (
    attention,
    causal_mask,
)

from jaxattn.tour.page import heading, random_matrix, show


def step_memory(say, *, out: Path):
    from jaxattn.functional import flash_attention, multi_head_attention
    from jaxattn.functional.flash import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, flash_block_plan

    heading(say, "Step 12. Memory-efficient attention")
    say("Dense attention materialises a [T, S] score matrix per head: memory grows with T².")
    say("flash_attention visits keys block by block with an online softmax, so its memory")
    say("grows with T. For each query it keeps a running maximum m, denominator l and weighted")
    say("sum o, and folds in a block of scores s_j with values v_j (Milakov and Gimelshein 2018):")
    m2 = sup(i("m"), o("′"))
    say.formula("m' = max(m, max_j s_j);  l' = l e^(m - m') + sum_j e^(s_j - m');  o' = o e^(m - m') + sum_j e^(s_j - m') v_j",
                block(m2, o("="), i("max"), paren(i("m"), o(","), sub(i("max"), i("j")), sub(i("s"), i("j"))), o(";"),
                      t("  "), sup(i("l"), o("′")), o("="), i("l"), sup(i("e"), row(i("m"), o("−"), m2)), o("+"),
                      under(o("∑"), i("j")), sup(i("e"), row(sub(i("s"), i("j")), o("−"), m2)), o(";"), t("  "),
                      sup(i("o"), o("′")), o("="), i("o"), sup(i("e"), row(i("m"), o("−"), m2)), o("+"),
                      under(o("∑"), i("j")), sup(i("e"), row(sub(i("s"), i("j")), o("−"), m2)), sub(i("v"), i("j"))))
    say("and the output is o / l once every block is in: the softmax, exactly, without the matrix.")
    say("Compiled temporary memory, B=1, H=8, D=64, float32, causal:")
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
    T = 4096
    x = jnp.zeros((1, T, 8, 64), jnp.float32)
    visible, complete = (np.asarray(a) for a in flash_block_plan(x, x, x, is_causal=True))
    say(f"At T = {T} the kernel's plan ({DEFAULT_BLOCK_Q} queries x {DEFAULT_BLOCK_KV} keys per block) visits "
        f"{int(visible.sum())} of {visible.size} block pairs;")
    say(f"{int(complete.sum())} of those lie wholly under the diagonal and need no mask at all.")
    path = viz.flash_figure(visible, complete, rows, out / "flash.png", T=T, block_q=DEFAULT_BLOCK_Q,
                            block_kv=DEFAULT_BLOCK_KV)
    show(say, path, "the flash kernel's block plan for a causal call, and memory vs T")
    return rows, (visible, complete)


def step_ring(say, *, out: Path, T: int = 32, n: int = 4, D: int = 8, seed: int = 50):
    """Ring attention simulated on one device: n chunks, each device folds the chunk it holds
    at every step into its online softmax; the result is dense causal attention."""
    from jaxattn.functional import ring_work_per_device, zigzag_order
    from jaxattn.functional.softmax import SoftmaxState, block_logits, online_softmax_finish, online_softmax_step

    heading(say, "Step 13. Attention across devices: ring attention")
    say("A sequence too long for one device is cut into n chunks, one per device (Liu et al. 2023,")
    say("arXiv 2310.01889). Each device keeps its queries; the key/value chunks travel around the")
    say("ring, one hop per step, and each device folds the chunk it holds into the online softmax of")
    say("step 12. After n steps every query has met every key, and no device ever held more than")
    say("two chunks:")
    say.formula("device d at step s holds the keys and values of chunk (d − s) mod n",
                block(t("device "), i("d"), t(" at step "), i("s"), t(" holds chunk "),
                      paren(i("d"), o("−"), i("s")), t(" mod "), i("n")))
    q, k, v = random_matrix(seed, (3, T, D)) / np.sqrt(np.sqrt(D))
    order = np.asarray(zigzag_order(T, n))  # device d holds tokens order[d*c:(d+1)*c]
    chunk = T // n
    out_rows = np.zeros((T, D), np.float32)
    for device in range(n):
        mine = order[device * chunk : (device + 1) * chunk]
        state = SoftmaxState.start((chunk,), D)
        for step in range(n):
            held = order[((device - step) % n) * chunk : ((device - step) % n + 1) * chunk]
            scores = block_logits(q[mine], k[held], scale=1 / np.sqrt(D))  # [c, c], as every kernel forms them
            state = online_softmax_step(scores, v[held], causal_mask(jnp.asarray(mine), jnp.asarray(held)), state)
        out_rows[mine] = np.asarray(online_softmax_finish(state)[0])
    dense = np.asarray(attention(q, k, v, mask=causal_mask(jnp.arange(T), jnp.arange(T))))
    difference = float(np.abs(out_rows - dense).max())
    say(f"Simulated here on one device (T = {T}, n = {n}, in zigzag order): the ring's result differs")
    say(f"from dense causal attention by {difference:.1e}. ring_attention runs the same steps on a mesh with")
    say("lax.ppermute (tests run it on 8 devices).")
    length, devices, sub = 4096, 4, 256
    c = length // devices // sub  # sub-blocks per chunk
    say("Under a causal mask, chunks in order give device i all of the i chunks before its own and the")
    say(f"lower half of its own: with c sub-blocks a chunk, i·c² + c(c + 1)/2 sub-block pairs, i + 1/2 chunks")
    say("of work (so the last of n devices does about 2n - 1 times the first's), and the slowest device")
    say("sets the pace; zigzag_order gives each device one early and one late chunk, so all do the same.")
    work = {"causal, in order": ring_work_per_device(length, devices, block=sub, zigzag=False),
            "causal, zigzag": ring_work_per_device(length, devices, block=sub, zigzag=True)}
    say(f"Sub-block pairs computed per device, counted with the kernel's own block plan (T = {length:,}, n = {devices},")
    say(f"blocks of {sub}, so c = {c}: {c * c}i + {c * (c + 1) // 2}): in order {work['causal, in order']}, "
        f"zigzag {work['causal, zigzag']}.")
    show(say, viz.ring_diagram(devices, work, out / "ring.png"),
         "which chunk each device holds at each step, and the causal work per device in order and in zigzag")
    return {"difference": difference, "work": work}
