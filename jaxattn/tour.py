"""The guided tour: one sentence through every step of attention.

``jaxattn tour`` runs ``run_tour``. Each step is a function that prints what it does,
draws its figures from what it really computed, and returns the numbers, so that the
tests can check what the learner sees. ``Page`` keeps everything printed and writes it,
with the figures in place, as one self-contained ``index.html``.
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import viz
from jaxattn.functional import (
    KVCache,
    attention,
    attention_weights,
    causal_mask,
    multi_head_attention,
    rope,
    sinusoidal_positions,
)

DEFAULT_TEXT = "The next day is bright"
FIGURE = "Figure: "


class Page:
    """Everything the tour prints, in order, passed on to ``say`` and kept for ``index.html``.

    A line ``Step N. Title`` starts a section; a line ``Figure: FILE - caption`` places
    the image FILE (in the output folder) there; everything else is shown as printed.
    """

    def __init__(self, say=print):
        self.say = say
        self.sections = [("", [])]  # (title, [("text", str) | ("figure", file, caption)])

    def __call__(self, line: str = "") -> None:
        self.say(line)
        line = str(line)
        if re.match(r"Step \d+\. ", line):
            self.sections.append((line, []))
        elif re.fullmatch(r"-+", line) and self.sections[-1][0]:
            return  # the heading's underline
        elif line.startswith(FIGURE):
            file, _, caption = line[len(FIGURE) :].partition(" - ")
            self.sections[-1][1].append(("figure", Path(file).name, caption))
        else:
            self.sections[-1][1].append(("text", line))

    def write(self, path) -> Path:
        """The walkthrough as one HTML file: no scripts, no network; the images are the PNG
        files next to it."""
        parts = []
        for title, items in self.sections:
            if title:
                parts.append(f"<h2 id='step-{title.split('.')[0].split()[-1]}'>{html.escape(title)}</h2>")
            text = []
            for item in items + [("end",)]:
                if item[0] == "text":
                    text.append(item[1])
                    continue
                if any(line.strip() for line in text):
                    parts.append("<pre>" + html.escape("\n".join(text).strip("\n")) + "</pre>")
                text = []
                if item[0] == "figure":
                    parts.append(f"<figure><img src='{html.escape(item[1])}' alt='{html.escape(item[2])}'>"
                                 f"<figcaption>{html.escape(item[2])}</figcaption></figure>")
        contents = "".join(f"<li><a href='#step-{t.split('.')[0].split()[-1]}'>{html.escape(t)}</a></li>"
                           for t, _ in self.sections if t)
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jaxattn tour</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ccc; padding-top: 0.6em; }}
pre {{ background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; line-height: 1.35; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>How attention inside an LLM works: the jaxattn tour</h1>
<p>Written by <code>jaxattn tour</code>: every number and figure below was computed by the library.</p>
<ol>{contents}</ol>
{"".join(parts)}
</body></html>
"""
        path = Path(path)
        path.write_text(page, encoding="utf-8")
        return path


def show(say, path, caption: str) -> Path:
    """Announces a figure (and, on the page, places it): ``Figure: FILE - caption``."""
    say(f"{FIGURE}{path} - {caption}")
    return Path(path)


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
    say("Each token becomes a row of an embedding table plus a sinusoidal position vector.")
    say("In steps 1-4 every matrix is random (seeded), not learned: the mechanics do not")
    say(f"depend on training. x has shape [T, C] = {list(x.shape)}.")
    return words, x


def step_self_attention(say, words, x, *, head_width: int, seed: int, out: Path):
    _heading(say, "Step 2. Self-attention, one head")
    C = x.shape[1]
    wq, wk, wv = _random_matrix(seed + 1, (3, C, head_width)) / np.sqrt(C)  # [C, D] each
    q, k, v = x @ wq, x @ wk, x @ wv  # [T, D]
    say(f"Three matrices [C, D] = [{C}, {head_width}] (random here, learned in a trained model)")
    say(f"project x into queries Q {list(q.shape)}, keys K {list(k.shape)} and values V {list(v.shape)}.")
    scores = (q @ k.T) / np.sqrt(head_width)  # [T, S]
    say("Scores Q K^T / sqrt(D): how well each query (row) matches each key (column):")
    say(format_matrix(scores, words, words))
    weights = attention_weights(q, k)  # [T, S]
    say("Softmax turns each row into weights that are positive and sum to 1:")
    say(format_matrix(weights, words, words))
    output = attention(q, k, v)  # [T, D]
    say(f"The output row of each token is its weighted sum of value rows: {list(output.shape)}.")
    show(say, viz.attention_heatmap(weights, words, words, out / "self_attention.png",
                                    title="Self-attention weights (one head)"), "the weights of one head")
    scaling = why_scale(say, out=out)
    return q, k, v, weights, scaling


def why_scale(say, *, out: Path, D: int = 512, S: int = 8, seed: int = 7):
    """One query against S keys at a large D, with and without dividing by sqrt(D)."""
    q = _random_matrix(seed, (1, D))  # [1, D]: unit-variance numbers, so q·k has variance D
    k = _random_matrix(seed + 1, (S, D))  # [S, D]
    scaled = attention_weights(q, k)[0]  # [S], scale 1/sqrt(D)
    raw = attention_weights(q, k, scale=1.0)[0]  # [S]

    def gradient_norm(scale):  # how much the weights move when the query moves
        return float(jnp.linalg.norm(jax.jacobian(lambda q: attention_weights(q, k, scale=scale)[0])(q)))

    norms = [gradient_norm(1.0), gradient_norm(None)]
    say("Why divide by sqrt(D)? A sum of D products of unit-variance numbers has variance D: at")
    say(f"D = {D} raw scores spread over about ±{np.sqrt(D):.0f}, and softmax turns them into an almost")
    say(f"one-hot row (largest weight {float(raw.max()):.3f}) whose gradient all but vanishes")
    say(f"(|| d weights / d q || = {norms[0]:.1e}); scaled, the largest weight is {float(scaled.max()):.3f} and the")
    say(f"gradient {norms[1]:.1e}: the head can still learn.")
    path = viz.scaling_figure(np.asarray(q @ k.T)[0], np.asarray(q @ k.T)[0] / np.sqrt(D), np.asarray(raw),
                              np.asarray(scaled), norms, out / "why_scale.png", D=D)
    show(say, path, f"one query against {S} keys at D = {D}, without and with the 1/sqrt(D) scale")
    return {"raw": raw, "scaled": scaled, "gradient_norms": norms}


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
    show(say, viz.attention_heatmap(weights, words, words, out / "causal_attention.png",
                                    title="Causal attention weights (one head)"), "causal weights: nothing above the diagonal")
    alignment = causal_alignment(say, out=out)
    return mask, weights, alignment


def causal_alignment(say, *, out: Path, cached: int = 5, T: int = 3, seed: int = 11):
    """A chunk of T queries after ``cached`` tokens: the mask by positions vs jax.nn's."""
    S = cached + T
    bottom_right = causal_mask(jnp.arange(T) + cached, jnp.arange(S))  # [T, S]
    q, k = _random_matrix(seed, (1, T, 1, S)), _random_matrix(seed + 1, (1, S, 1, S))  # jax.nn wants E = D
    one_hot_values = jnp.eye(S)[None, :, None, :]  # [1, S, 1, S]: the output row is the weight row
    jax_nn = jax.nn.dot_product_attention(q, k, one_hot_values, is_causal=True)[0, :, 0]  # [T, S]
    top_left = np.asarray(jax_nn) > 0
    say(f"When T < S (a chunk of {T} new tokens after {cached} cached ones), the queries are the")
    say("last T positions. jaxattn's mask comes from positions, so it is aligned bottom-right;")
    say("jax.nn.dot_product_attention(is_causal=True) aligns top-left (query i sees keys <= i)")
    wrong = int((np.asarray(bottom_right) != top_left).sum())
    say(f"and here hides {wrong} keys that the chunk's queries should see (marked ✗ in the figure).")
    show(say, viz.alignment_figure(bottom_right, top_left, out / "causal_alignment.png", cached=cached),
         f"a {T}-token chunk after {cached} cached tokens: bottom-right (right) vs top-left (wrong)")
    return {"bottom_right": bottom_right, "top_left": top_left, "cached": cached}


def step_multi_head(say, words, x, *, heads: int, kv_heads: int, head_width: int, seed: int, out: Path):
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
    _heading(say, "Step 5. Where tokens are: RoPE")
    say("Attention by itself does not know the order of the tokens: shuffle keys and values")
    say("together and the output does not change. Step 1 added a position vector to each")
    say("embedding; most LLMs today rotate the queries and keys instead (RoPE, Su et al. 2021).")
    say(f"The D = {D} numbers of a head form D/2 pairs; pair i of the token at position m is")
    say("rotated by the angle m·θ_i, θ_i = 10000^(-2i/D): fast turns for the first pairs, slow for")
    say("the last. Rotating q by m·θ and k by n·θ leaves q·k depending only on m − n.")
    q, k = _random_matrix(seed, (D,)), _random_matrix(seed + 1, (D,))
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


def step_kv_cache(say, model, text: str, *, out: Path, new: int = 200):
    from jaxattn.lm.generate import generate
    from jaxattn.lm.tokenizer import encode

    _heading(say, "Step 6. The KV cache")
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
    for t in range(T):
        logits, cache = step(params, tokens[:, t : t + 1], cache)
        decoded.append(logits)
    difference = float(jnp.max(jnp.abs(jnp.concatenate(decoded, axis=1) - full)))
    say("Decoding the sentence token by token with the cache reproduces the full pass's")
    say(f"logits: largest difference {difference:.1e}.")
    layer = cache[0]
    say(f"Cache per layer: k and v [B, S_max, K, D] = {list(layer.k.shape)}, and lengths [B] = {layer.lengths.tolist()}")
    say("(how many slots each row holds; also the position of its next token).")
    prompt = [encode(text)]
    with_cache = _timed(lambda: generate(model, prompt, max_new_tokens=new))
    without = _timed(lambda: generate(model, prompt, max_new_tokens=new, use_cache=False))
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


def step_next_token(say, model, text: str, source: Path):
    from jaxattn.lm.generate import Sampling, generate
    from jaxattn.lm.tokenizer import decode, encode, token_label

    _heading(say, "Step 7. The next token")
    tokens = jnp.asarray(encode(text))[None]
    probabilities = jax.nn.softmax(jax.jit(model)(tokens)[0, -1])  # [V]
    top = jnp.argsort(-probabilities)[:5]
    say(f"The trained model ({source}) after {text!r}, top 5 next bytes (␣ is a space):")
    for rank, token in enumerate(top.tolist(), start=1):
        say(f"  {rank}. {token_label(token):6} {float(probabilities[token]):6.1%}")
    continuation = generate(model, [encode(text)], max_new_tokens=80, sampling=Sampling(temperature=0.7, top_p=0.95))
    say(f"A sampled continuation (temperature 0.7): {text + decode(continuation[0])!r}")
    return [(int(t), float(probabilities[t])) for t in top.tolist()]


def step_latent_attention(say, text: str, *, seed: int, out: Path):
    from jaxattn.functional import kv_cache_elements_per_token, latent_cache_elements_per_token
    from jaxattn.functional.mla import mla_latents, mla_queries
    from jaxattn.lm.tokenizer import encode
    from jaxattn.nn import TransformerConfig, TransformerLM

    _heading(say, "Step 8. Multi-head latent attention (DeepSeek-V2)")
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
    say(f"after {text!r} from the naive path (keys/values decompressed per head) and from the")
    say(f"absorbed path (attention directly over the cached latents) differ by {difference:.1e};")
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
    naive_flow = [("h", named("B", "T", "C"), "input"), ("c_kv = h W_dkv,  k_r = RoPE(h W_kr)", named("B", "S", "L") + " " + named("B", "S", "R"), "cached"),
                  ("k_c = c_kv W_uk,  v_c = c_kv W_uv  (every step, every head)", named("B", "S", "H", "D"), "weight"),
                  ("q = [c_q W_uq ; RoPE(c_q W_qr)]", named("B", "T", "H", "D") + "+R", "computed"),
                  ("softmax([q_c; q_r]·[k_c; k_r] / sqrt(D + R)) v_c", named("B", "T", "H", "E"), "computed"),
                  ("u = o W_o", named("B", "T", "C"), "computed")]
    absorbed_flow = [("h", named("B", "T", "C"), "input"), ("c_kv, k_r (written once per token)", named("B", "S", "L") + " " + named("B", "S", "R"), "cached"),
                     ("q_lat = q_c W_ukᵀ  (W_uk moves to the query)", named("B", "T", "H", "L"), "weight"),
                     ("softmax([q_lat; q_r]·[c_kv; k_r] / sqrt(D + R)) c_kv  (one K/V head: MQA)", named("B", "T", "H", "L"), "computed"),
                     ("o = o_lat W_uv  (W_uv moves to the output)", named("B", "T", "H", "E"), "weight"),
                     ("u = o W_o", named("B", "T", "C"), "computed")]
    cache_sizes = {"MHA (H=128)": mha, "GQA (K=8)": kv_cache_elements_per_token(kv_heads=8, head_dim=D),
                   "MQA (K=1)": kv_cache_elements_per_token(kv_heads=1, head_dim=D), "MLA (L+R)": mla}
    path = viz.mla_figure(naive_flow, absorbed_flow, cache_sizes, out / "mla.png")
    show(say, path, "MLA's naive and absorbed paths (shapes of this small model), and cache sizes per token")
    return difference, cache_sizes


def step_memory(say, *, out: Path):
    from jaxattn.functional import flash_attention, multi_head_attention
    from jaxattn.functional.flash import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, flash_block_plan

    _heading(say, "Step 9. Memory-efficient attention")
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


def step_todays_attention(say, words, *, out: Path, seed: int):
    """Soft-capping, learned sinks, local and global layers, NoPE and RoPE scaling: each from
    the library's own functions, with why the models' authors chose it."""
    from jaxattn.functional import multi_head_attention_weights
    from jaxattn.functional.positions import RopeScaling, rope_frequencies
    from jaxattn.functional.softmax import soft_cap
    from jaxattn.nn import TransformerConfig, TransformerLM

    _heading(say, "Step 10. Attention in today's models")
    say("The models people run today keep the attention of steps 2-9 and change a few things in it.")
    say("")
    say("Soft-capping (Gemma 2, arXiv 2408.00118). A logit s becomes cap·tanh(s/cap): nearly s while")
    say("small, never beyond ±cap. Gemma 2 caps attention logits at 50 and the final logits at 30; it")
    say("keeps one runaway score from taking a whole softmax row, which its authors found steadies")
    say("training. The cap comes after the scale and before the mask (a capped mask value would give")
    say("masked keys real weight). QK-norm does the same job another way: Qwen3, OLMo 2 and Gemma 3")
    say("RMS-normalise each query and key head before RoPE (ViT-22B, arXiv 2302.05442), so logits")
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
    sink = 1.0
    T = len(words)
    qs, ks = _random_matrix(seed + 20, (1, T, 1, 8)), _random_matrix(seed + 21, (1, T, 1, 8))
    without = np.asarray(multi_head_attention_weights(qs, ks, is_causal=True))[0, 0]
    with_sink = np.asarray(multi_head_attention_weights(qs, ks, is_causal=True, sinks=jnp.array([sink])))[0, 0]
    share = 1 - with_sink.sum(-1)
    say(f"One head over {words} with a sink logit of {sink:g}: the rows sum to")
    say(f"{', '.join(f'{x:.2f}' for x in with_sink.sum(-1))}; the first token, with one key to see, gives the sink")
    say(f"{share[0]:.0%}. With nothing visible at all the sink takes everything and the output is 0.")
    show(say, viz.sink_figure(without, with_sink, share, words, out / "sinks.png", sink=sink),
         "one head's weights without and with a learned sink, and the share each row gives it")
    say("")
    say("Local and global layers (Mistral 7B; Gemma 2, 1:1; Gemma 3, 5:1, arXiv 2503.19786). A local")
    say("layer sees a sliding window of recent tokens and caches only that window; a global layer")
    say("sees everything. Interleaving them keeps long-range reading at a fraction of the cache: Gemma 3")
    say("found the 5:1 pattern with a 1,024-token window about as good as all-global, and gives its")
    say("local layers RoPE base 10k and its global layers 1M. jaxattn: layer_types, window, local_rope_theta;")
    say("each local layer gets a ring-buffer cache of the window, each global one a full cache.")
    layers, window = 24, 1024
    common = dict(vocab_size=256, width=512, layers=layers, heads=8, kv_heads=4, head_dim=128, mlp_hidden=1024,
                  max_length=131072, dtype="bfloat16")
    patterns = {"all global (Llama)": ("global",) * layers, "1:1 (Gemma 2)": ("local", "global") * (layers // 2),
                "5:1 (Gemma 3)": (("local",) * 5 + ("global",)) * (layers // 6)}
    lengths = [1024, 4096, 16384, 65536, 131072]
    curves = {}
    for name, kinds in patterns.items():
        config = TransformerConfig(**common, layer_types=kinds, window=window if "local" in kinds else None)
        model = nnx.eval_shape(lambda config=config: TransformerLM(config, rngs=nnx.Rngs(0)))
        mib = []
        for length in lengths:  # the shapes init_cache allocates (one decode token per call), not the arrays
            cache = jax.eval_shape(lambda length=length: model.init_cache(1, max_length=length, chunk=1))
            mib.append(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)) / 2**20)
        curves[name] = (lengths, mib)
    at = lengths.index(131072)
    say(f"A {layers}-layer model, 4 key/value heads of width 128, bfloat16, window {window}: at 128k tokens the")
    say("cache is " + ", ".join(f"{curves[name][1][at]:,.0f} MiB {name}" for name in patterns) + ".")
    show(say, viz.layer_pattern_figure(patterns, curves, out / "local_global.png"),
         "three layer patterns and the KV cache each needs")
    say("")
    say("NoPE layers (SmolLM3, every 4th layer; Llama 4). A layer without any position encoding still")
    say("knows the order through the causal mask (Kazemnejad et al. 2023, arXiv 2305.19466), and with")
    say("no rotation its scores do not fade or wobble with distance, which helps with contexts longer than")
    say("training saw. jaxattn: nope_layers. Below, one query and one key at every distance.")
    D = 64
    qv, kv = np.asarray(_random_matrix(seed + 30, (D,))), np.asarray(_random_matrix(seed + 31, (D,)))
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
    say("the fast frequencies alone, which resolve nearby tokens, and slow only those whose wavelength")
    say("exceeds the context, blending in between; YaRN also sharpens the softmax a little (cos and")
    say("sin times 0.1·ln(factor) + 1). LongRoPE (Phi-3) learns one factor per frequency.")
    R, theta, context = 128, 500000.0, 8192
    kinds = {"none": None, "linear x4": RopeScaling("linear", factor=4.0),
             "dynamic (NTK), at 4x": RopeScaling("dynamic", factor=4.0, max_length=context),
             "llama3 x4": RopeScaling("llama3", factor=4.0, original_max_length=context),
             "yarn x4": RopeScaling("yarn", factor=4.0, original_max_length=context)}
    wavelengths = {}
    for name, scaling in kinds.items():
        frequencies, factor = rope_frequencies(R, theta, scaling, seq_len=4 * context)
        wavelengths[name] = 2 * np.pi / np.asarray(frequencies, np.float64)
    kept = int(np.sum(np.isclose(wavelengths["llama3 x4"], wavelengths["none"])))
    say(f"R = {R}, θ = {theta:,.0f}, trained on {context:,} tokens: llama3 keeps {kept} of {R // 2} frequencies as")
    say("they were; linear slows all of them.")
    show(say, viz.rope_scaling_figure(wavelengths, context, out / "rope_scaling.png"),
         "every RoPE wavelength before and after scaling to 4x the context")
    return {"softcap": (plain, bent), "sinks": (without, with_sink), "cache_mib": curves, "wavelengths": wavelengths,
            "nope": scores}


def run_tour(text: str = DEFAULT_TEXT, *, out="jaxattn-tour", seed: int = 0, checkpoint=None, say=print,
             generated_tokens: int = 200) -> dict:
    """Walks ``text`` through attention, step by step; figures and ``index.html`` go to ``out``.
    ``generated_tokens``: how many tokens the KV-cache step generates to time the cache.

    Returns the arrays each step computed, keyed by name.
    """
    if checkpoint is not None:  # a wrong --checkpoint is an error now, not after five steps
        from jaxattn.lm.checkpoint import RunFolder

        RunFolder(checkpoint).read_run()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = Page(say)
    page(f"jaxattn tour: how attention inside an LLM works (figures and index.html in {out})")
    words, x = step_tokens(page, text, width=16, seed=seed)
    q, k, v, weights, scaling = step_self_attention(page, words, x, head_width=8, seed=seed, out=out)
    mask, causal_weights, alignment = step_causal(page, words, q, k, out=out)
    together, one_by_one, head_weights = step_multi_head(page, words, x, heads=4, kv_heads=2, head_width=4, seed=seed,
                                                         out=out)
    positions = step_positions(page, out=out)
    model, source = tour_model(page, checkpoint, out)
    cache_difference, cached_s, uncached_s, snapshots = step_kv_cache(page, model, text, out=out, new=generated_tokens)
    top5 = step_next_token(page, model, text, source)
    mla_difference, cache_sizes = step_latent_attention(page, text, seed=seed, out=out)
    memory, flash_plan = step_memory(page, out=out)
    today = step_todays_attention(page, words, out=out, seed=seed)
    page("")
    index = page.write(out / "index.html")
    page(f"Done. The whole tour with its figures: {index.resolve()}")
    return {
        "cache_difference": cache_difference,
        "generation_seconds": {"with_cache": cached_s, "recomputing": uncached_s},
        "mla_difference": mla_difference,
        "memory": memory,
        "flash_plan": flash_plan,
        "today": today,
        "top5": top5,
        "words": words,
        "x": x,
        "q": q,
        "k": k,
        "v": v,
        "weights": weights,
        "scaling": scaling,
        "causal_mask": mask,
        "causal_weights": causal_weights,
        "alignment": alignment,
        "multi_head": together,
        "one_head_loop": one_by_one,
        "head_weights": head_weights,
        "rope": positions,
        "cache_snapshots": snapshots,
        "cache_sizes": cache_sizes,
        "index": index,
    }
