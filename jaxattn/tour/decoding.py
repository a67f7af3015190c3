"""Steps 7-10, with a trained model: the KV cache, what a decode step pays for, the next
token, and where a trained model looks (the attention sink)."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import viz
from jaxattn.mathml import block, frac, i, o, sub, t
from jaxattn.functional import (
    KVCache,
    multi_head_attention,
)

from jaxattn.tour.page import heading, random_matrix, show, timed


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


def step_kv_cache(say, model, text: str, *, out: Path, new: int = 200):
    from jaxattn.lm.generate import generate
    from jaxattn.lm.tokenizer import encode

    heading(say, "Step 7. The KV cache")
    tokens = jnp.asarray(encode(text))[None]  # [1, T]
    T = tokens.shape[1]
    say(f"From here on the model is trained (its weights are learned). It reads bytes: {text!r}")
    say(f"is T = {T} tokens. To generate, it predicts one token, appends it, and predicts again.")
    say("Without a cache every step recomputes the keys and values of all earlier tokens; with")
    say("a KV cache each step computes them only for the new token and reads the rest.")
    graphdef, params = nnx.split(model)
    full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)  # [1, T, V]
    step = jax.jit(lambda p, t, c: nnx.merge(graphdef, p)(t, cache=c))
    cache = model.init_cache(1, max_length=T)
    decoded = []
    for position in range(T):
        logits, cache = step(params, tokens[:, position : position + 1], cache)
        decoded.append(logits)
    difference = float(jnp.max(jnp.abs(jnp.concatenate(decoded, axis=1) - full)))
    say("Decoding the sentence token by token with the cache reproduces the full pass's")
    say(f"logits: largest difference {difference:.1e}.")
    layer = cache[0]
    say(f"Cache per layer: k and v [B, S_max, K, D] = {list(layer.k.shape)}, and lengths [B] = {layer.lengths.tolist()}")
    say("(how many slots each row holds; also the position of its next token).")
    prompt = [encode(text)]
    with_cache = timed(lambda: generate(model, prompt, max_new_tokens=new))
    without = timed(lambda: generate(model, prompt, max_new_tokens=new, use_cache=False))
    say(f"Generating {new} tokens: {new / with_cache:,.0f} tokens/s with the cache, "
        f"{new / without:,.0f} tokens/s recomputing everything ({without / with_cache:.1f}x slower).")
    snapshots = ragged_cache_snapshots()
    say("In a batch, rows have their own lengths: every write lands at the row's own length")
    say("(" + "; ".join(f"{title}: lengths {lengths}" for title, lengths, _ in snapshots) + ").")
    path = viz.kv_cache_figure(snapshots, {"with the cache": with_cache / new, "recomputing": without / new},
                               out / "kv_cache.png")
    show(say, path, "a ragged batch's cache over a prompt and two decode steps, and the cost of one generated token")
    return difference, with_cache, without, snapshots


def ragged_cache_snapshots(capacity: int = 8):
    """A real KVCache of 2 rows: a ragged prompt (3 and 5 tokens), then two decode steps."""
    cache = KVCache.create(batch=2, max_length=capacity, kv_heads=1, head_dim=2)
    prompt = jnp.ones((2, 5, 1, 2))
    _, cache = cache.update(prompt, prompt, num_new=jnp.array([3, 5]))
    snapshots = [("after the ragged prompt", cache.lengths.tolist(), capacity)]
    for step in (1, 2):
        token = jnp.ones((2, 1, 1, 2))
        _, cache = cache.update(token, token)
        snapshots.append((f"after decode step {step}", cache.lengths.tolist(), capacity))
    return snapshots


def step_decode_cost(say, *, out: Path, capacity: int = 16384, heads: int = 8, kv_heads: int = 2, D: int = 64):
    """One decode step over a cache of ``capacity`` slots, timed against the tokens it holds."""
    from jaxattn.functional import decode_attention

    heading(say, "Step 8. Decoding pays for the tokens present")
    say("A cache is allocated once, for the longest text it may hold (its capacity S_max), and")
    say("fills up one token per step. A dense kernel reads every slot and masks the empty ones, so")
    say("each step costs as much as a full cache. decode_attention visits the cache block by block")
    say("with the online softmax (step 12) and stops after the last block that holds a token:")
    say.formula("cost of a step ∝ ceil(n / b) blocks of b keys, not S_max / b",
                block(t("cost of a step"), o("∝"), o("⌈"), frac(i("n"), i("b")), o("⌉"), t(" blocks of "), i("b"),
                      t(" keys, not "), frac(sub(i("S"), t("max")), i("b"))))
    q = random_matrix(41, (1, 1, heads, D))
    k, v = random_matrix(42, (2, 1, capacity, kv_heads, D))
    dense = jax.jit(lambda q, k, v, n: multi_head_attention(q, k, v, kv_lengths=n))
    paged = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, kv_lengths=n))
    present = [capacity // 32, capacity // 8, capacity // 2, capacity]
    seconds = {"dense kernel (every slot, masked)": [], "decode_attention (the slots in use)": []}
    for count in present:
        lengths = jnp.asarray([count], jnp.int32)
        for (name, times), kernel in zip(seconds.items(), (dense, paged)):
            jax.block_until_ready(kernel(q, k, v, lengths))  # compile (once) and warm up
            runs = []
            for _ in range(7):
                start = time.perf_counter()
                jax.block_until_ready(kernel(q, k, v, lengths))
                runs.append(time.perf_counter() - start)
            times.append(min(runs))  # the least disturbed of 7 runs
    difference = float(jnp.max(jnp.abs(dense(q, k, v, jnp.asarray([present[0]])) - paged(q, k, v, jnp.asarray([present[0]])))))
    say(f"Measured now: one step, H = {heads}, K = {kv_heads}, D = {D}, a cache of {capacity:,} slots, best of 7:")
    say(f"  {'tokens present':>15} {'dense':>10} {'decode':>10}")
    dense_s, decode_s = seconds.values()
    for count, a, b in zip(present, dense_s, decode_s):
        say(f"  {count:>15,} {a * 1e3:>7.2f} ms {b * 1e3:>7.2f} ms")
    spread = max(dense_s) / min(dense_s) - 1
    say(f"The two agree (largest difference {difference:.1e}). With {present[0]:,} of {capacity:,} slots in use, a step")
    say(f"of decode_attention takes {decode_s[0] / decode_s[-1]:.0%} of its time on a full cache. The dense kernel reads")
    say(f"every slot whatever the cache holds, so its times differ only by timing noise ({spread:.0%} between its")
    say("slowest and fastest here; a step of a few milliseconds on a shared 2-core machine moves that much).")
    say(f"On a full cache decode_attention takes {decode_s[-1] / dense_s[-1]:.0%} of the dense kernel's time: when there is")
    say("nothing to skip, its block loop (rescaling the running sum at every block, step 12) is work the")
    say("dense kernel's single softmax does not do. It wins wherever the cache is not full, which is")
    say("every step but the last of a generation that fills it.")
    show(say, viz.line_chart({name: (present, [x * 1e3 for x in times]) for name, times in seconds.items()},
                             out / "decode_cost.png", title=f"One decode step, cache capacity {capacity:,}",
                             xlabel="tokens present in the cache", ylabel="ms per step", logx=True, logy=True),
         "the time of one decode step against the tokens the cache holds, at a fixed capacity")
    return {"present": present, "seconds": seconds, "difference": difference}


def step_next_token(say, model, text: str, source: Path, *, out: Path):
    from jaxattn.lm.generate import Sampling, generate
    from jaxattn.lm.tokenizer import decode, encode, token_label

    heading(say, "Step 9. The next token")
    tokens = jnp.asarray(encode(text))[None]
    probabilities = jax.nn.softmax(jax.jit(model)(tokens)[0, -1])  # [V]
    top = jnp.argsort(-probabilities)[:5]
    say(f"The trained model ({source}) after {text!r}, top 5 next bytes (␣ is a space):")
    for rank, token in enumerate(top.tolist(), start=1):
        say(f"  {rank}. {token_label(token):6} {float(probabilities[token]):6.1%}")
    continuation = generate(model, [encode(text)], max_new_tokens=80, sampling=Sampling(temperature=0.7, top_p=0.95))
    say(f"A sampled continuation (temperature 0.7): {text + decode(continuation[0])!r}")
    show(say, viz.next_token_figure([token_label(t) for t in top.tolist()], [float(probabilities[t]) for t in top.tolist()],
                                    out / "next_token.png", title=f"After {text!r}"),
         "the five most likely next bytes")
    return [(int(t), float(probabilities[t])) for t in top.tolist()]


def step_attention_sink(say, model, text: str, *, out: Path, seed: int):
    """Where the trained model's heads look on the text, against the same model untrained;
    and the explorer page of the trained model."""
    from jaxattn.lm.explorer import write_explorer
    from jaxattn.lm.inspection import capture_attention, head_roles, induction_test
    from jaxattn.lm.tokenizer import ByteTokenizer, encode, token_label
    from jaxattn.nn import TransformerLM

    heading(say, "Step 10. Where a trained model looks: the attention sink")
    say("Trained language models park much of their attention on the first token, whatever it")
    say("says: the attention sink (Xiao et al. 2023, arXiv 2309.17453). A head that has nothing to")
    say("look for still has to spend its softmax somewhere (its weights sum to 1), and the first")
    say("token, which every query sees, is where training puts it. Measured on the trained model")
    say("above and on the same model untrained: the mean weight that queries 3 to T (counting from 1;")
    say("for the first two, the first token is also the token itself or the one before) put on the")
    say("first token, per layer and head.")
    tokens = np.asarray(encode(text))[None]  # [1, T]
    labels = [token_label(int(token)) for token in tokens[0]]
    _, trained = capture_attention(model, tokens)
    untrained_model = TransformerLM(model.config, rngs=nnx.Rngs(seed))
    _, untrained = capture_attention(untrained_model, tokens)
    trained, untrained = np.asarray(trained[:, 0]), np.asarray(untrained[:, 0])  # [L, H, T, T]
    first, first_untrained = head_roles(trained).first, head_roles(untrained).first
    layer, head = np.unravel_index(int(np.argmax(first)), first.shape)
    uniform = np.mean([1 / (row + 1) for row in range(2, tokens.shape[1])])  # a causal row's even share, averaged
    say(f"Strongest sink: layer {layer} head {head} puts {first[layer, head]:.0%} of each query's weight on {labels[0]!r};")
    say(f"untrained, no head puts more than {first_untrained.max():.0%} there (an even spread over a causal row")
    say(f"gives it {uniform:.0%} on average). A small model trained for minutes has a weak sink; in large")
    say("models (GPT-2, Llama) many heads give the first token most of their weight.")
    show(say, viz.sink_share_figure(first, first_untrained, trained[layer, head], labels, out / "attention_sink.png",
                                    layer=int(layer), head=int(head)),
         "first-token share of every head, trained and untrained, and the strongest sink head's map")
    scores = induction_test(model, ByteTokenizer())[2]
    _, _, untrained_scores = induction_test(untrained_model, ByteTokenizer())
    best = np.unravel_index(int(np.argmax(scores)), scores.shape)
    say("Does it have an induction head (a head that, on random text written twice, looks from a")
    say("repeated token to what followed it the first time; step 17)? No: the best score of any head is")
    say(f"{scores[best]:.2f} (layer {best[0]} head {best[1]}; an induction head scores near 1), against {untrained_scores.max():.2f} untrained.")
    say("A layer-0 head could not be one anyway: it needs a head of an earlier layer to have written")
    say("each token's predecessor next to it. Step 17 trains a model in which an induction circuit forms.")
    page = write_explorer(out / "explorer.html", trained, labels, title=f"Attention on {text!r}",
                          description=f"the tour's trained model: {model.config.layers} layers x "
                                      f"{model.config.heads} heads", induction=scores)
    say.link(page.name, "Explore every head of the trained model on this sentence (hover and click the tokens)")
    return {"first": first, "first_untrained": first_untrained, "weights": trained, "induction": scores,
            "explorer": page}
