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
from jaxattn.mathml import block, frac, i, n, o, paren, row, sqrt, sub, subsup, sup, t, under
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

    A line ``Step N. Title`` starts a section; a line ``Figure: FILE - caption`` places the
    image FILE (in the output folder) there; ``formula(text, mathml)`` prints a formula as
    text and typesets it on the page; ``link(href, words)`` prints the words and links them
    on the page. On the page, printed lines become paragraphs, except indented or
    column-aligned ones (tables, matrices), which stay as printed; each section ends with
    its console transcript, folded.
    """

    def __init__(self, say=print):
        self.say = say
        self.sections = [{"title": "", "items": [], "transcript": []}]

    def __call__(self, line: str = "") -> None:
        self.say(line)
        line = str(line)
        section = self.sections[-1]
        if re.match(r"Step \d+\. ", line):
            self.sections.append({"title": line, "items": [], "transcript": [line]})
            return
        section["transcript"].append(line)
        if re.fullmatch(r"-+", line) and section["title"] and len(section["transcript"]) == 2:
            return  # the heading's underline
        if line.startswith(FIGURE):
            file, _, caption = line[len(FIGURE) :].partition(" - ")
            section["items"].append(("figure", Path(file).name, caption))
        else:
            section["items"].append(("text", line))

    def formula(self, text: str, mathml: str) -> None:
        """A displayed formula: ``text`` on the console, ``mathml`` (``jaxattn.mathml``) on the page."""
        self.say("  " + text)
        self.sections[-1]["transcript"].append("  " + text)
        self.sections[-1]["items"].append(("math", mathml))

    def link(self, href: str, words: str) -> None:
        self.say(f"{words}: {href}")
        self.sections[-1]["transcript"].append(f"{words}: {href}")
        self.sections[-1]["items"].append(("link", href, words))

    @staticmethod
    def _preformatted(line: str) -> bool:
        return line.startswith("  ") or re.search(r"\S {2,}\S", line) is not None

    def _body(self, items) -> list[str]:
        parts, paragraph, preformatted = [], [], []

        def flush():
            if paragraph:
                parts.append("<p>" + html.escape(" ".join(line.strip() for line in paragraph)) + "</p>")
            if preformatted:
                parts.append("<pre>" + html.escape("\n".join(preformatted)) + "</pre>")
            paragraph.clear()
            preformatted.clear()

        for item in items:
            if item[0] == "text" and item[1].strip():
                if self._preformatted(item[1]):
                    if paragraph:
                        flush()
                    preformatted.append(item[1])
                else:
                    if preformatted:
                        flush()
                    paragraph.append(item[1])
                continue
            flush()
            if item[0] == "figure":
                parts.append(f"<figure><img src='{html.escape(item[1])}' alt='{html.escape(item[2])}'>"
                             f"<figcaption>{html.escape(item[2])}</figcaption></figure>")
            elif item[0] == "math":
                parts.append(item[1])
            elif item[0] == "link":
                parts.append(f"<p class='link'><a href='{html.escape(item[1])}'>{html.escape(item[2])}</a></p>")
        flush()
        return parts

    def write(self, path) -> Path:
        """The walkthrough as one HTML file: no scripts, no network (the formulas are MathML,
        which browsers draw themselves); the images are the PNG files next to it."""
        parts = []
        for section in self.sections:
            title = section["title"]
            if title:
                parts.append(f"<section id='step-{title.split('.')[0].split()[-1]}'><h2>{html.escape(title)}</h2>")
            else:
                parts.append("<section id='introduction'>")
            parts.extend(self._body(section["items"]))
            transcript = "\n".join(section["transcript"]).strip("\n")
            if title and transcript:
                parts.append("<details class='transcript'><summary>What the console printed</summary>"
                             f"<pre>{html.escape(transcript)}</pre></details>")
            parts.append("</section>")
        contents = "".join(f"<li><a href='#step-{s['title'].split('.')[0].split()[-1]}'>{html.escape(s['title'])}</a></li>"
                           for s in self.sections if s["title"])
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jaxattn tour</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.5; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ccc; padding-top: 0.6em; }}
pre {{ background: #f6f8fa; padding: 0.8em; font-size: 0.85em; line-height: 1.35; white-space: pre-wrap;
      overflow-wrap: anywhere; }}
math[display=block] {{ margin: 0.8em 0; font-size: 1.15em; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #555; font-size: 0.9em; }}
details.transcript {{ color: #555; font-size: 0.9em; margin: 0.5em 0 1.5em; }}
</style></head><body>
<h1>How attention inside an LLM works: the jaxattn tour</h1>
<p>Written by <code>jaxattn tour</code>: every number and figure below was computed by the library on this
machine. Each step ends with what the console printed.</p>
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

    Returns ``(words, vocabulary, token_ids, x [T, C], embedding rows [T, C])`` with
    ``x = embedding[token] + sinusoidal_positions``.
    """
    words = text.split()
    if not words:
        raise ValueError("the tour needs a text with at least one word")
    vocabulary = sorted(set(words))
    token_ids = jnp.array([vocabulary.index(word) for word in words])
    table = _random_matrix(seed, (len(vocabulary), width)) / np.sqrt(width)  # [V, C]
    x = table[token_ids] + sinusoidal_positions(len(words), width)  # [T, C]
    return words, vocabulary, token_ids, x, table[token_ids]


def step_tokens(say, text: str, *, width: int, seed: int, out: Path):
    _heading(say, "Step 1. Tokens and embeddings")
    words, vocabulary, token_ids, x, token_rows = embed_words(text, width=width, seed=seed)
    say(f"Text: {text!r}")
    say(f"Tokenized into words (split on spaces): {words}")
    say(f"Token ids (index in the sorted vocabulary {vocabulary}): {token_ids.tolist()}")
    say("Each token becomes a row of an embedding table plus a sinusoidal position vector.")
    say("In steps 1-6 every matrix is random (seeded), not learned: the mechanics do not")
    say(f"depend on training. x has shape [T, C] = {list(x.shape)}.")
    show(say, viz.embedding_figure(words, token_rows, x - token_rows, out / "embeddings.png"),
         "each word's embedding row, its position vector, and their sum: the rows attention starts from")
    return words, x


def step_self_attention(say, words, x, *, head_width: int, seed: int, out: Path):
    _heading(say, "Step 2. Self-attention, one head")
    C = x.shape[1]
    wq, wk, wv = _random_matrix(seed + 1, (3, C, head_width)) / np.sqrt(C)  # [C, D] each
    q, k, v = x @ wq, x @ wk, x @ wv  # [T, D]
    say(f"Three matrices [C, D] = [{C}, {head_width}] (random here, learned in a trained model)")
    say(f"project x into queries Q {list(q.shape)}, keys K {list(k.shape)} and values V {list(v.shape)}.")
    say.formula("Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V",
                block(i("Attention"), paren(i("Q"), o(","), i("K"), o(","), i("V")), o("="), i("softmax"),
                      paren(frac(row(i("Q"), sup(i("K"), i("T"))), sqrt(i("D")))), i("V")))
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
    say.formula("w_ij = exp(s_ij) / sum_{j' <= i} exp(s_ij')  for j <= i,  and 0 for j > i",
                block(sub(i("w"), row(i("i"), i("j"))), o("="), frac(
                    row(i("exp"), sub(i("s"), row(i("i"), i("j")))),
                    row(under(o("∑"), row(sup(i("j"), o("′")), o("≤"), i("i"))), i("exp"),
                        sub(i("s"), row(i("i"), sup(i("j"), o("′")))))),
                      t("  for "), i("j"), o("≤"), i("i"), o(","), t("  and 0 for "), i("j"), o(">"), i("i")))
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


def step_packed(say, words, q, k, causal_weights, *, out: Path):
    """Two documents in one row: segment ids keep them apart, positions restart in each."""
    from jaxattn.functional import multi_head_attention_weights

    _heading(say, "Step 4. Packed sequences: one rule for every mask")
    T = len(words)
    say("Training packs several documents into one row so that no slot is wasted on padding.")
    say("Each token then carries a segment id (which document) and its position inside its own")
    say("document. jaxattn builds every mask from one rule over those (masks.py): a query sees a")
    say("key of its own segment at the same or an earlier position, and, with a window W, not")
    say("more than W - 1 positions back:")
    say.formula("visible(i, j) = [seg_i = seg_j] and [pos_j <= pos_i] and [pos_i - pos_j < W]",
                block(i("visible"), paren(i("i"), o(","), i("j")), o("="),
                      o("["), sub(i("seg"), i("i")), o("="), sub(i("seg"), i("j")), o("]"), o("∧"),
                      o("["), sub(i("pos"), i("j")), o("≤"), sub(i("pos"), i("i")), o("]"), o("∧"),
                      o("["), sub(i("pos"), i("i")), o("−"), sub(i("pos"), i("j")), o("<"), i("W"), o("]")))
    say("Causal attention is the case of one segment; padding is a segment of its own; a cache")
    say("chunk after S cached tokens is positions S, S + 1, ... Here the sentence is packed twice")
    say(f"into one row of {2 * T} tokens: segment ids {[0] * T + [1] * T},")
    say(f"positions {list(range(T)) * 2}.")
    positions = jnp.asarray(list(range(T)) * 2)[None]  # [1, 2T]
    segments = jnp.asarray([0] * T + [1] * T)[None]  # [1, 2T]
    packed_q = jnp.concatenate([q, q])[None, :, None]  # [1, 2T, 1, D]
    packed_k = jnp.concatenate([k, k])[None, :, None]
    weights = multi_head_attention_weights(packed_q, packed_k, is_causal=True, q_positions=positions,
                                           kv_positions=positions, q_segment_ids=segments,
                                           kv_segment_ids=segments)[0, 0]  # [2T, 2T]
    weights = np.asarray(weights)
    leak = float(np.abs(weights[T:, :T]).max())
    same = max(float(np.abs(weights[:T, :T] - causal_weights).max()), float(np.abs(weights[T:, T:] - causal_weights).max()))
    say(f"The second copy puts weight {leak:g} on the first, and each copy's weights are step 3's")
    say(f"(largest difference {same:.1e}): packing changes nothing a document sees.")
    labels = [f"{word}·{segment}" for segment in (0, 1) for word in words]
    show(say, viz.attention_heatmap(weights, labels, labels, out / "packed.png",
                                    title="Two packed documents (word·segment): one block each"),
         "the sentence packed twice into one row: each document attends only to itself")
    return weights


def step_multi_head(say, words, x, *, heads: int, kv_heads: int, head_width: int, seed: int, out: Path):
    _heading(say, "Step 5. Multi-head attention")
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
    _heading(say, "Step 6. Where tokens are: RoPE")
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

    _heading(say, "Step 7. The KV cache")
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


def step_decode_cost(say, *, out: Path, capacity: int = 16384, heads: int = 8, kv_heads: int = 2, D: int = 64):
    """One decode step over a cache of ``capacity`` slots, timed against the tokens it holds."""
    from jaxattn.functional import decode_attention

    _heading(say, "Step 8. Decoding pays for the tokens present")
    say("A cache is allocated once, for the longest text it may hold (its capacity S_max), and")
    say("fills up one token per step. A dense kernel reads every slot and masks the empty ones, so")
    say("each step costs as much as a full cache. decode_attention visits the cache block by block")
    say("with the online softmax (step 12) and stops after the last block that holds a token:")
    say.formula("cost of a step ∝ ceil(n / b) blocks of b keys, not S_max / b",
                block(t("cost of a step"), o("∝"), o("⌈"), frac(i("n"), i("b")), o("⌉"), t(" blocks of "), i("b"),
                      t(" keys, not "), frac(sub(i("S"), t("max")), i("b"))))
    q = _random_matrix(41, (1, 1, heads, D))
    k, v = _random_matrix(42, (2, 1, capacity, kv_heads, D))
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
    say(f"The two agree (largest difference {difference:.1e}). With {present[0]:,} of {capacity:,} slots in use, a step")
    say(f"of decode_attention takes {decode_s[0] / decode_s[-1]:.0%} of its time on a full cache; the dense kernel's")
    say(f"takes {dense_s[0] / dense_s[-1]:.0%} of its own, whatever the cache holds.")
    show(say, viz.line_chart({name: (present, [x * 1e3 for x in times]) for name, times in seconds.items()},
                             out / "decode_cost.png", title=f"One decode step, cache capacity {capacity:,}",
                             xlabel="tokens present in the cache", ylabel="ms per step", logx=True, logy=True),
         "the time of one decode step against the tokens the cache holds, at a fixed capacity")
    return {"present": present, "seconds": seconds, "difference": difference}


def step_next_token(say, model, text: str, source: Path, *, out: Path):
    from jaxattn.lm.generate import Sampling, generate
    from jaxattn.lm.tokenizer import decode, encode, token_label

    _heading(say, "Step 9. The next token")
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

    _heading(say, "Step 10. Where a trained model looks: the attention sink")
    say("Trained language models park much of their attention on the first token, whatever it")
    say("says: the attention sink (Xiao et al. 2023, arXiv 2309.17453). A head that has nothing to")
    say("look for still has to spend its softmax somewhere (its weights sum to 1), and the first")
    say("token, which every query sees, is where training puts it. Measured on the trained model")
    say("above and on the same model untrained: the mean weight that the 3rd to the last query put")
    say("on the first token, per layer and head.")
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
    best = np.unravel_index(int(np.argmax(scores)), scores.shape)
    say(f"On random text written twice, the trained model's best induction head is layer {best[0]} head {best[1]}")
    say(f"(score {scores[best]:.2f}: the weight a repeated token puts on what followed it the first time).")
    page = write_explorer(out / "explorer.html", trained, labels, title=f"Attention on {text!r}",
                          description=f"the tour's trained model: {model.config.layers} layers x "
                                      f"{model.config.heads} heads", induction=scores)
    say.link(page.name, "Explore every head of the trained model on this sentence (hover and click the tokens)")
    return {"first": first, "first_untrained": first_untrained, "weights": trained, "induction": scores,
            "explorer": page}


def step_latent_attention(say, text: str, *, seed: int, out: Path):
    from jaxattn.functional import kv_cache_elements_per_token, latent_cache_elements_per_token
    from jaxattn.functional.mla import mla_latents, mla_queries
    from jaxattn.lm.tokenizer import encode
    from jaxattn.nn import TransformerConfig, TransformerLM

    _heading(say, "Step 11. Multi-head latent attention (DeepSeek-V2)")
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
    say("Why RoPE is kept out of the latent: the trick that makes MLA fast (below) merges W_uk into the")
    say("query, since q_c·k_c = (c_q W_uq)·(c_kv W_uk) needs W_uq and W_uk only as one product. RoPE")
    say("rotates a query at position t by R_t and a key at position s by R_s, and the product of the")
    say("two rotations sits between the weights, different for every pair of positions:")
    say.formula("(R_t W_uq c_q)^T (R_s W_uk c_kv) = c_q^T W_uq^T R_(s-t) W_uk c_kv",
                block(sup(paren(sub(i("R"), i("t")), sub(i("W"), t("uq")), sub(i("c"), i("q"))), i("T")),
                      paren(sub(i("R"), i("s")), sub(i("W"), t("uk")), sub(i("c"), t("kv"))), o("="),
                      subsup(i("c"), i("q"), i("T")), subsup(i("W"), t("uq"), i("T")),
                      sub(i("R"), row(i("s"), o("−"), i("t"))), sub(i("W"), t("uk")), sub(i("c"), t("kv"))))
    say("so W_uq^T R_(s-t) W_uk cannot be computed once. MLA therefore rotates only a separate, small")
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
    say(f"from decoding the last token (mla_absorbed: attention directly over the cached latents)")
    say(f"differ by {difference:.1e};")
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


def step_memory(say, *, out: Path):
    from jaxattn.functional import flash_attention, multi_head_attention
    from jaxattn.functional.flash import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, flash_block_plan

    _heading(say, "Step 12. Memory-efficient attention")
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
    from jaxattn.functional.softmax import SoftmaxState, online_softmax_finish, online_softmax_step

    _heading(say, "Step 13. Attention across devices: ring attention")
    say("A sequence too long for one device is cut into n chunks, one per device (Liu et al. 2023,")
    say("arXiv 2310.01889). Each device keeps its queries; the key/value chunks travel around the")
    say("ring, one hop per step, and each device folds the chunk it holds into the online softmax of")
    say("step 12. After n steps every query has met every key, and no device ever held more than")
    say("two chunks:")
    say.formula("device d at step s holds the keys and values of chunk (d − s) mod n",
                block(t("device "), i("d"), t(" at step "), i("s"), t(" holds chunk "),
                      paren(i("d"), o("−"), i("s")), t(" mod "), i("n")))
    q, k, v = _random_matrix(seed, (3, T, D)) / np.sqrt(np.sqrt(D))
    order = np.asarray(zigzag_order(T, n))  # device d holds tokens order[d*c:(d+1)*c]
    chunk = T // n
    out_rows = np.zeros((T, D), np.float32)
    for device in range(n):
        mine = order[device * chunk : (device + 1) * chunk]
        state = SoftmaxState.start((chunk,), D)
        for step in range(n):
            held = order[((device - step) % n) * chunk : ((device - step) % n + 1) * chunk]
            scores = (q[mine] @ k[held].T) / np.sqrt(D)  # [c, c]
            state = online_softmax_step(scores, v[held], causal_mask(jnp.asarray(mine), jnp.asarray(held)), state)
        out_rows[mine] = np.asarray(online_softmax_finish(state)[0])
    dense = np.asarray(attention(q, k, v, mask=causal_mask(jnp.arange(T), jnp.arange(T))))
    difference = float(np.abs(out_rows - dense).max())
    say(f"Simulated here on one device (T = {T}, n = {n}, in zigzag order): the ring's result differs")
    say(f"from dense causal attention by {difference:.1e}. ring_attention runs the same steps on a mesh with")
    say("lax.ppermute (tests run it on 8 devices).")
    say("Under a causal mask, chunks in order give device i about 2i + 1 times the first device's")
    say("work, and the slowest device sets the pace; zigzag_order gives each device one early and one")
    say("late chunk, so all do the same. Sub-block pairs computed per device (T = 4,096, n = 4, blocks")
    length, devices, sub = 4096, 4, 256
    work = {"causal, in order": ring_work_per_device(length, devices, block=sub, zigzag=False),
            "causal, zigzag": ring_work_per_device(length, devices, block=sub, zigzag=True)}
    say(f"of {sub}): in order {work['causal, in order']}, zigzag {work['causal, zigzag']}.")
    show(say, viz.ring_diagram(devices, work, out / "ring.png"),
         "which chunk each device holds at each step, and the causal work per device in order and in zigzag")
    return {"difference": difference, "work": work}


def step_todays_attention(say, words, *, out: Path, seed: int):
    """Soft-capping, learned sinks, local and global layers, NoPE and RoPE scaling: each from
    the library's own functions, with why the models' authors chose it."""
    from jaxattn.functional import multi_head_attention_weights
    from jaxattn.functional.positions import RopeScaling, rope_frequencies
    from jaxattn.functional.softmax import soft_cap
    from jaxattn.nn import TransformerConfig, TransformerLM

    _heading(say, "Step 14. Attention in today's models")
    say("The models people run today keep the attention of steps 2-13 and change a few things in it.")
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
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = Page(say)
    page(f"jaxattn tour: how attention inside an LLM works (figures and index.html in {out})")
    words, x = step_tokens(page, text, width=16, seed=seed, out=out)
    q, k, v, weights, scaling = step_self_attention(page, words, x, head_width=8, seed=seed, out=out)
    mask, causal_weights, alignment = step_causal(page, words, q, k, out=out)
    packed = step_packed(page, words, q, k, np.asarray(causal_weights), out=out)
    together, one_by_one, head_weights = step_multi_head(page, words, x, heads=4, kv_heads=2, head_width=4, seed=seed,
                                                         out=out)
    positions = step_positions(page, out=out)
    model, source = tour_model(page, checkpoint, out)
    cache_difference, cached_s, uncached_s, snapshots = step_kv_cache(page, model, text, out=out, new=generated_tokens)
    decode_cost = step_decode_cost(page, out=out)
    top5 = step_next_token(page, model, text, source, out=out)
    sink = step_attention_sink(page, model, text, out=out, seed=seed)
    mla_difference, cache_sizes = step_latent_attention(page, text, seed=seed, out=out)
    memory, flash_plan = step_memory(page, out=out)
    ring = step_ring(page, out=out)
    today = step_todays_attention(page, words, out=out, seed=seed)
    page("")
    index = page.write(out / "index.html")
    page(f"Done in {time.perf_counter() - started:.0f} s. The whole tour with its figures: {index.resolve()}")
    return {
        "cache_difference": cache_difference,
        "packed": packed,
        "decode_cost": decode_cost,
        "sink": sink,
        "ring": ring,
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
