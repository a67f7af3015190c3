"""The tour, run as its notebook (``docs/tour.ipynb``) on a tiny trained model: its numbers
follow from its inputs, its figures from the library, its page holds every step and every
figure, and every cell shows what a notebook would show."""

import ast
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import causal_mask, flash_block_map
from jaxattn.lm.checkpoint import RunFolder
from jaxattn.lm.data import Corpus
from jaxattn.lm.tokenizer import encode
from jaxattn.lm.train import TrainConfig, train
from jaxattn.nn import TransformerConfig
from jaxattn.lm.explorer import ExplorerPage
from jaxattn.tour import StepView
from tests.pages import network_requests, open_page

NOTEBOOK = Path(__file__).parent.parent / "docs" / "tour.ipynb"
pytestmark = pytest.mark.xdist_group("tour")  # one worker, and session fixtures: the notebook runs once

FIGURES = ("embeddings.png", "self_attention.png", "why_scale.png", "causal_attention.png", "causal_alignment.png", "packed.png",
           "multi_head.png", "rope.png", "kv_cache.png", "decode_cost.png", "next_token.png", "attention_sink.png", "mla.png", "flash.png",
           "ring.png", "softcap.png", "sinks.png", "local_global.png", "nope.png", "rope_scaling.png", "page_tables.png",
           "batching.png", "speculative.png", "preemption.png", "roofline.png", "int8_cache.png", "induction.png")
STEPS = ("Tokens and embeddings", "Self-attention, one head", "Causal attention", "Packed sequences",
         "Multi-head attention", "Where tokens are: RoPE", "The KV cache", "Decoding pays for the tokens present",
         "The next token", "Where a trained model looks: the attention sink", "Multi-head latent attention",
         "Memory-efficient attention", "Attention across devices: ring attention", "Attention in today's models",
         "Serving many requests", "Why one-token decoding is bound by memory bandwidth", "An induction circuit forms")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A briefly trained tiny model, so the tour's model steps never train a real one here."""
    tokens = encode("The next day is bright and the sky is clear. " * 30)
    path = tmp_path_factory.mktemp("tour") / "run"
    config = TransformerConfig(width=16, layers=1, heads=2, kv_heads=1, head_dim=8, mlp_hidden=32, max_length=320)
    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, eval_windows=1)
    train(config, tc, Corpus(tokens[:1000], tokens[1000:], "sky"), RunFolder(path), progress=False, say=lambda *_: None)
    return path


def run_notebook(path, parameters: dict):
    """Runs a notebook's code cells in order in one namespace, as a kernel would: the cell
    tagged "parameters" first, then ``parameters`` over it; a cell ending in an expression
    shows its value (kept, as a notebook's output). Returns ``(namespace, shown values)``."""
    namespace, shown = {}, []
    for index, cell in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, f"{path}:cell {index}", "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            namespace.update(parameters)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), f"{path}:cell {index}", "eval"), namespace)
            if value is not None:
                shown.append(value)
    return namespace, shown


@pytest.fixture(scope="session")
def notebook(tmp_path_factory, tiny_run):
    """One run of the tour's notebook (it takes a while): its folder, result, printed lines
    and what its cells showed."""
    out = tmp_path_factory.mktemp("tour-out")
    lines = []
    namespace, shown = run_notebook(NOTEBOOK, dict(out=out, checkpoint=tiny_run, say=lines.append, generated_tokens=20))
    return out, namespace["result"], lines, shown


@pytest.fixture(scope="session")
def tour(notebook):
    return notebook[:3]


def test_the_tour(tour):
    """Four sets of checks on one run."""
    check_numbers_follow_from_the_inputs(tour)
    check_every_figure_and_the_page_are_written(tour)
    check_figures_show_the_librarys_own_computations(tour)
    check_the_new_steps(tour)
    check_serving_speed_and_induction(tour)


def test_the_notebook_shows_each_step_and_the_explorer(notebook):
    """Each step's cell shows that step (its text, its figures embedded); the last cell shows
    the explorer page inline, in a sandboxed iframe holding the whole page."""
    out, result, _, shown = notebook
    steps = [value for value in shown if isinstance(value, StepView)]
    assert [view.title.split(".")[0] for view in steps] == [f"Step {n}" for n in range(1, len(STEPS) + 1)]
    for view in steps:
        page = view._repr_html_()
        figures = [item[1] for item in view.section["items"] if item[0] == "figure"]
        assert figures and page.count("src='data:image/png;base64,") == len(figures), view.title
    assert shown[-2] == result["index"]
    explorer = shown[-1]
    assert isinstance(explorer, ExplorerPage)
    frame = explorer._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in frame
    assert html_unescape(frame.split('srcdoc="', 1)[1].split('" sandbox', 1)[0]) == explorer.html
    assert "The next day is bright" in explorer.html


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_the_tour_page_in_a_browser(browser, tour):
    """Every step renders with its figures and formulas, nothing is fetched from the network,
    the console stays clean, and the explorer page it links to opens and works."""
    from selenium.webdriver.common.by import By

    out, result, _ = tour
    assert [entry for entry in open_page(browser, out / "index.html") if entry["level"] == "SEVERE"] == []
    assert network_requests(browser) == []  # only the PNG files next to the page
    sections = browser.find_elements(By.CSS_SELECTOR, "section[id^=step-]")
    titles = [section.find_element(By.TAG_NAME, "h2").text for section in sections]
    assert len(titles) == len(STEPS) and all(title.startswith(f"Step {n}. {step}")
                                             for n, (title, step) in enumerate(zip(titles, STEPS), 1)), titles
    for section in sections:
        images = section.find_elements(By.TAG_NAME, "img")
        assert images, section.get_attribute("id")
        for image in images:  # loaded and drawn
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100
    formulas = browser.find_elements(By.CSS_SELECTOR, "math")
    assert len(formulas) >= 10
    assert browser.execute_script("return arguments[0].getBoundingClientRect().height", formulas[0]) > 20  # typeset
    paragraphs = browser.find_elements(By.CSS_SELECTOR, "section p")
    assert len(paragraphs) > 40 and not any("\n" in p.text for p in paragraphs[:5])  # prose, not console lines
    for pre in browser.find_elements(By.CSS_SELECTOR, "pre"):  # nothing overflows its box
        assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth + 1", pre)
    for step, figures in ((15, ("page_tables.png", "batching.png", "speculative.png", "preemption.png")),
                          (16, ("roofline.png", "int8_cache.png")), (17, ("induction.png",))):
        section = browser.find_element(By.CSS_SELECTOR, f"#step-{step}")
        shown = [image.get_attribute("src").rsplit("/", 1)[-1] for image in section.find_elements(By.TAG_NAME, "img")]
        assert shown == list(figures), (step, shown)
    speed = browser.find_element(By.CSS_SELECTOR, "#step-16").text
    assert "Worked example, GPT-2 small" in speed and "124,439,808 parameters" in speed and "GB/s" in speed
    assert "int8 + scales 19,008" in speed  # GPT-2 small's int8 cache: bytes per token
    assert browser.find_elements(By.CSS_SELECTOR, "#step-17 a[href='induction_explorer.html']")
    link = browser.find_element(By.CSS_SELECTOR, "#step-10 a[href='explorer.html']")
    link.click()
    assert browser.current_url.endswith("explorer.html")
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
    weights = result["sink"]["weights"]
    tokens[4].click()
    shown = [float(token.get_attribute("data-weight")) for token in tokens]
    np.testing.assert_allclose(shown, weights[0, 0, 4], atol=5e-4 + 1e-6, rtol=0)
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    assert network_requests(browser) == []


def check_numbers_follow_from_the_inputs(tour):
    _, result, lines = tour
    q, k = np.asarray(result["q"], np.float64), np.asarray(result["k"], np.float64)
    logits = q @ k.T / np.sqrt(q.shape[1])
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(result["weights"], expected / expected.sum(1, keepdims=True), rtol=1e-5)
    causal = np.where(np.tril(np.ones_like(logits, bool)), logits, -np.inf)
    expected = np.exp(causal - causal.max(1, keepdims=True))
    np.testing.assert_allclose(result["causal_weights"], expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result["multi_head"][0], result["one_head_loop"], rtol=1e-5, atol=1e-6)
    assert result["words"] == ["The", "next", "day", "is", "bright"]
    assert any("Step 3. Causal attention" in line for line in lines)
    assert result["cache_difference"] < 1e-4  # cached decoding reproduces the full pass
    probabilities = [p for _, p in result["top5"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert result["mla_difference"] < 1e-4  # the absorbed path gives the naive path's logits
    (T1, dense1, flash1), _, (T3, dense3, flash3) = result["memory"]
    assert dense3 / dense1 > 100 and flash3 / flash1 < 40  # T grows 16x: quadratic vs linear
    assert any("lengths [B] = [22]" in line for line in lines)  # shapes named with the glossary's letters
    assert any("␣ is a space" in line for line in lines)


def check_every_figure_and_the_page_are_written(tour):
    out, _, lines = tour
    for name in FIGURES:
        assert (out / name).stat().st_size > 5_000, name
        assert any(line.startswith("Figure: ") and name in line for line in lines), name

    class Page(HTMLParser):
        images, headings, text = [], [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])

        def handle_data(self, data):
            self.text.append(data)

    page = Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    text = "".join(page.text)
    assert sorted(page.images) == sorted(FIGURES)  # every figure, in place, and nothing else
    assert all((out / src).is_file() for src in page.images)
    for number, title in enumerate(STEPS, start=1):
        assert f"Step {number}. {title}" in text
    assert "Largest difference from running the kernel head by head" in text  # the printed text is on the page
    assert not re.search(r"https?://", (out / "index.html").read_text())  # opens without a network


def check_figures_show_the_librarys_own_computations(tour):
    _, result, _ = tour
    for style, scores in result["rope"]["scores"].items():  # q·k after RoPE depends only on m - n: Toeplitz
        np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-4, err_msg=style)
    alignment = result["alignment"]
    cached = alignment["cached"]
    T, S = alignment["bottom_right"].shape
    np.testing.assert_array_equal(alignment["bottom_right"], causal_mask(jnp.arange(T) + cached, jnp.arange(S)))
    np.testing.assert_array_equal(alignment["top_left"], causal_mask(jnp.arange(T), jnp.arange(S)))  # what jax.nn did
    visible, complete = result["flash_plan"]
    x = jnp.zeros((1, 4096, 8, 64))
    np.testing.assert_array_equal(visible, flash_block_map(x, x, x, is_causal=True))  # the kernel's own plan
    assert complete.sum() < visible.sum() and not (complete & ~visible).any()
    raw, scaled = result["scaling"]["raw"], result["scaling"]["scaled"]
    assert float(raw.max()) > 0.99 and float(scaled.max()) < 0.9  # saturated without the scale, not with it
    unscaled_gradient, scaled_gradient = result["scaling"]["gradient_norms"]
    assert scaled_gradient > 1e3 * unscaled_gradient
    snapshots = result["cache_snapshots"]
    assert [lengths for _, lengths, _ in snapshots] == [[3, 5], [4, 6], [5, 7]]  # each row writes at its own length
    assert result["cache_sizes"]["MLA (L+R)"] == 576 and result["cache_sizes"]["MHA (H=128)"] == 32768
    assert jax.numpy.asarray(result["head_weights"]).shape == (4, 5, 5)
    today = result["today"]
    plain, capped = today["softcap"]  # the row [12, 6, 4, 2, 0], softmax without and with a cap of 5
    logits = np.array([12.0, 6.0, 4.0, 2.0, 0.0])
    for row, bent in ((plain, logits), (capped, 5 * np.tanh(logits / 5))):
        np.testing.assert_allclose(row, np.exp(bent) / np.exp(bent).sum(), rtol=1e-5)
    without, with_sink = today["sinks"]  # a sink scales each row by one number, Z / (Z + e^sink), and nothing else
    np.testing.assert_allclose(without, result["causal_weights"], atol=1e-6)  # the panel shows step 3's head
    visible = without > 0
    ratio = with_sink / np.where(visible, without, 1)
    row_sums = np.broadcast_to(with_sink.sum(-1, keepdims=True), ratio.shape)
    np.testing.assert_allclose(ratio[visible], row_sums[visible], rtol=1e-5)
    assert np.all(with_sink.sum(-1) < 1)
    lengths, global_mib = today["cache_mib"]["all global (Llama)"]
    kv = 2 * 4 * 128 * 2  # bytes per token and layer: (k, v) x K x D x bfloat16
    assert global_mib[-1] == pytest.approx(24 * kv * 131072 / 2**20, rel=1e-6)
    _, gemma3_mib = today["cache_mib"]["5:1, window 1,024 (Gemma 3)"]  # 20 local layers keep 1,024 tokens (and positions)
    assert gemma3_mib[-1] == pytest.approx((4 * 131072 * kv + 20 * 1024 * (kv + 4)) / 2**20, rel=1e-6)


def check_the_new_steps(tour):
    _, result, lines = tour
    words = result["words"]
    T = len(words)
    packed = result["packed"]  # two copies of the sentence: block-diagonal, each block step 3's weights
    np.testing.assert_array_equal(packed[T:, :T], 0.0)
    np.testing.assert_allclose(packed[:T, :T], result["causal_weights"], atol=1e-6)
    np.testing.assert_allclose(packed[T:, T:], result["causal_weights"], atol=1e-6)
    cost = result["decode_cost"]
    assert cost["difference"] < 1e-5 and cost["present"] == sorted(cost["present"])
    assert all(x > 0 for times in cost["seconds"].values() for x in times)
    sink = result["sink"]
    L, H = sink["first"].shape
    weights = sink["weights"]  # the trained model's own maps: what the explorer page shows
    np.testing.assert_allclose(sink["first"], weights[..., 2:, 0].mean(-1), rtol=1e-6)
    assert sink["explorer"].is_file() and sink["induction"].shape == (L, H)
    ring = result["ring"]
    assert ring["difference"] < 1e-5
    in_order, zigzag = ring["work"]["causal, in order"], ring["work"]["causal, zigzag"]
    assert in_order == sorted(in_order) and in_order[0] < in_order[-1] and len(set(zigzag)) == 1
    assert sum(in_order) == sum(zigzag)  # the same work, spread evenly
    assert any("93.3% smaller" in line for line in lines) and any("R_(t-s)" in line for line in lines)


def check_serving_speed_and_induction(tour):
    """Steps 15-17 against what they must be: counted page tables, batching and speculative
    decoding that equals greedy decoding; GPT-2 small's published sizes; the shipped induction
    run's circuit."""
    _, result, _ = tour
    serving = result["serving"]
    tables, references, shared = serving["tables"], serving["references"], serving["shared_pages"]
    prefix_pages = {tuple(pages[:shared]) for pages in tables.values()}
    assert shared >= 1 and len(prefix_pages) == 1  # one copy of the prefix, in every table
    assert all(references[page] == len(tables) for page in next(iter(prefix_pages)))
    own = [page for pages in tables.values() for page in pages[shared:]]
    assert len(own) == len(set(own)) and all(references[page] == 1 for page in own)
    lengths = [40, 6, 24, 8, 12, 30]  # static batching, 3 slots: each batch as long as its longest request
    assert serving["static_steps"] == sum(max(lengths[i : i + 3]) for i in range(0, 6, 3))
    assert serving["continuous_steps"] < serving["static_steps"]
    assert serving["accepted"] <= serving["drafted"]
    assert serving["accepted"] + serving["verify_steps"] + 1 == 40  # every verify step adds its accepted drafts + 1
    assert serving["speculative_tokens"] == serving["greedy_tokens"]  # speculative decoding is greedy decoding
    assert serving["preempted"] >= 1 and serving["recomputed"] > 0 and serving["steps_tight"] > serving["steps_roomy"]
    speed = result["speed"]
    assert speed["gpt2_parameters"] == 124_439_808  # GPT-2 small, as published (tied embeddings counted once)
    assert speed["cache_bytes"]["gpt2"] == {"float32": 73_728, "bfloat16": 36_864, "int8 + scales": 19_008}
    limits = speed["limits"]
    assert limits["bandwidth"] > 0 and limits["peak_flops"] >= limits["prefill"][1]
    assert speed["int8_cost"]["same_top_token"] > 0.9 and abs(speed["int8_cost"]["int8_bits"] - speed["int8_cost"]["float_bits"]) < 0.05
    induction = result["induction"]  # the shipped run: a textbook induction head, which needs its previous-token head
    circuit = induction["circuit"]
    assert circuit.scores.max() >= 0.5 and circuit.offset == 1 and circuit.scores_without_reads.max() < 0.1
    assert all(layer < circuit.copying[0] for layer, _ in circuit.reads) and circuit.reads_previous.min() > 0.5
    assert circuit.ablated[circuit.reads[0]] > circuit.loss + 1
    assert induction["untrained"].max() < 0.05
    losses, scores = induction["history"]["repeated_half_loss"], induction["history"]["induction_score"]
    assert losses[0] > 4 and losses[-1] < losses[0] - 2 and scores[0] < 0.05 and induction["formed_step"] is not None
    assert induction["explorer"].is_file()
