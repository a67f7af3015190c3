"""The explorer page: its encoding keeps every weight, a GPT-2-small-sized page stays small,
and in a real browser a reader's choices and clicks show the model's own weights, with no
request leaving the page and no error on its console."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from jaxattn.cli import main
from jaxattn.lm.explorer import QUANTUM, encode_weights, explorer_page
from jaxattn.lm.inspection import capture_attention, induction_test
from jaxattn.lm.load import load_any
from tests.pages import network_requests, open_page

FIXTURES = Path(__file__).parent.parent / "data" / "hf"


def causal_weights(shape, seed=0):
    """Random causal softmax rows: float64 [..., T, T]."""
    logits = np.random.default_rng(seed).standard_normal(shape) * 3
    T = shape[-1]
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def read_page(path):
    """The data a page carries, decoded here independently of the page's script: ``(weights
    [L, H, T, T], labels, roles)``."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', text, re.S)
                      .group(1).replace("<\\/", "</"))
    L, H, T, _ = data["weights"]["shape"]
    values = np.frombuffer(base64.b64decode(data["weights"]["data"]), "<u2").astype(np.float64) / data["quantum"]
    weights = np.zeros((L, H, T, T))
    if data["weights"]["packing"] == "lower":
        rows, cols = np.tril_indices(T)
        weights[..., rows, cols] = values.reshape(L, H, -1)
    else:
        weights[:] = values.reshape(L, H, T, T)
    return weights, data["labels"], data["roles"]


def test_the_encoding_keeps_every_weight_and_stores_a_causal_map_as_its_triangle(tmp_path):
    weights = causal_weights((2, 3, 7, 7))
    encoded = encode_weights(weights)
    assert encoded["packing"] == "lower" and len(base64.b64decode(encoded["data"])) == 2 * 2 * 3 * 28
    (tmp_path / "page.html").write_text(explorer_page(weights, list("abcdefg"), title="t"), encoding="utf-8")
    decoded, labels, roles = read_page(tmp_path / "page.html")
    np.testing.assert_allclose(decoded, weights, atol=0.5 / QUANTUM + 1e-12, rtol=0)
    assert labels == list("abcdefg") and set(roles) == {"sink", "previous", "self"}
    full = np.full((1, 1, 3, 3), 1 / 3)  # not causal: every entry is kept
    assert encode_weights(full)["packing"] == "full"
    for bad, message in ((np.ones((3, 3, 3)), r"\[L, H, T, T\]"), (np.full((1, 1, 2, 2), np.nan), "lie in"),
                         (np.full((1, 1, 2, 2), 2.0), "lie in")):
        with pytest.raises(ValueError, match=message):
            encode_weights(bad)
    with pytest.raises(ValueError, match="need 7 token labels"):
        explorer_page(weights, list("abc"), title="t")
    with pytest.raises(ValueError, match=r"induction scores must be \[L, H\] = \[2, 3\]"):
        explorer_page(weights, list("abcdefg"), title="t", induction=np.zeros((3, 2)))


def test_a_gpt2_small_sized_page_stays_under_5_mb():
    weights = causal_weights((12, 12, 128, 128)).astype(np.float32)  # 12 layers x 12 heads, 128 tokens
    page = explorer_page(weights, [f"t{i}" for i in range(128)], title="GPT-2 small on 128 tokens")
    size = len(page.encode("utf-8"))
    print(f"GPT-2-small-sized page: {size / 1e6:.2f} MB")
    assert size < 5e6


# ------------------------------------------------------------------ in a real browser

TEXT = "The sky is clear and the day is long"


@pytest.fixture(scope="module")
def llama3_page(tmp_path_factory):
    """`jaxattn inspect --html --induction` on a Llama-3-style checkpoint (a BOS first), and the
    weights the model computes for the same text."""
    folder = tmp_path_factory.mktemp("explorer")
    path = folder / "explorer.html"
    assert main(["inspect", str(FIXTURES / "llama3"), TEXT, "--out", str(folder / "grid.png"), "--html", str(path),
                 "--induction"]) == 0
    model, tokenizer, _ = load_any(FIXTURES / "llama3")
    _, weights = capture_attention(model, tokenizer.encode(TEXT)[None])
    induction = induction_test(model, tokenizer)[2]
    return path, np.asarray(weights[:, 0], np.float64), induction


def shown_weights(browser):
    return np.array([float(token.get_attribute("data-weight")) for token in browser.find_elements(By.CSS_SELECTOR, ".tok")])


def errors(log):
    return [entry for entry in log if entry["level"] == "SEVERE"]


def test_choosing_a_head_and_a_token_shows_the_models_weights(browser, llama3_page):
    path, weights, induction = llama3_page
    L, H, T, _ = weights.shape
    assert errors(open_page(browser, path)) == []
    assert network_requests(browser) == []  # everything is inline
    layer, head = Select(browser.find_element(By.ID, "layer")), Select(browser.find_element(By.ID, "head"))
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
    assert [t.find_element(By.CLASS_NAME, "label").text for t in tokens][1:4] == ["The", "␣sky", "␣is"]
    for l, h, token in ((1, 2, T - 1), (0, 3, 4), (1, 0, 0)):
        layer.select_by_value(str(l))
        head.select_by_value(str(h))
        tokens[token].click()  # where this token looks: its row, to 3 digits
        np.testing.assert_allclose(shown_weights(browser), weights[l, h, token], atol=5e-4 + 1e-6, rtol=0)
    browser.find_element(By.ID, "dir-to").click()  # what looks at it: its column
    tokens[2].click()
    np.testing.assert_allclose(shown_weights(browser), weights[1, 0, :, 2], atol=5e-4 + 1e-6, rtol=0)
    assert "looks most at token 2" in browser.find_element(By.ID, "info").text
    browser.find_element(By.ID, "dir-from").click()
    ActionChains(browser).move_to_element(tokens[5]).perform()  # hovering previews another token ...
    np.testing.assert_allclose(shown_weights(browser), weights[1, 0, 5], atol=5e-4 + 1e-6, rtol=0)
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "title")).perform()  # ... and leaving restores it
    np.testing.assert_allclose(shown_weights(browser), weights[1, 0, 2], atol=5e-4 + 1e-6, rtol=0)
    assert errors(browser.get_log("browser")) == []


def test_all_heads_of_a_layer_and_the_table_of_roles(browser, llama3_page):
    path, weights, induction = llama3_page
    L, H, T, _ = weights.shape
    open_page(browser, path)
    Select(browser.find_element(By.ID, "layer")).select_by_value("1")
    Select(browser.find_element(By.ID, "head")).select_by_value("all")
    multiples = browser.find_elements(By.CSS_SELECTOR, "#multiples figure")
    assert len(multiples) == H and not browser.find_element(By.ID, "heatmap").is_displayed()
    multiples[3].click()  # one of the small maps opens that head
    assert Select(browser.find_element(By.ID, "head")).first_selected_option.get_attribute("value") == "3"
    assert browser.find_element(By.ID, "heatmap").is_displayed()
    rows = browser.find_elements(By.CSS_SELECTOR, "#roles tbody tr")
    assert len(rows) == L * H
    header = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#roles thead th")]
    assert header == ["layer", "head", "sink", "previous", "self", "induction"]
    shown = np.array([[float(c.text) for c in row.find_elements(By.CSS_SELECTOR, "td[data-kind=induction]")] for row in rows])
    np.testing.assert_allclose(shown.reshape(L, H), induction, atol=0.005 + 1e-6)  # two digits on the page
    sink = np.array([float(row.find_element(By.CSS_SELECTOR, "td[data-kind=sink]").text) for row in rows])
    np.testing.assert_allclose(sink.reshape(L, H), weights[..., 2:, 0].mean(-1), atol=0.005 + 1e-6)
    best = int(np.argmax(induction))  # the strongest induction head is marked
    assert "top" in rows[best].find_element(By.CSS_SELECTOR, "td[data-kind=induction]").get_attribute("class")
    rows[H + 1].click()  # a row of the table opens its head
    assert Select(browser.find_element(By.ID, "layer")).first_selected_option.get_attribute("value") == "1"
    assert Select(browser.find_element(By.ID, "head")).first_selected_option.get_attribute("value") == "1"
    assert errors(browser.get_log("browser")) == []


def test_inspect_html_writes_a_page_for_a_run_folder_and_for_the_induction_test_alone(tmp_path, capsys):
    run = Path(__file__).parent.parent / "data" / "release-0.2.0" / "run"  # a byte-level jaxattn run folder
    assert main(["inspect", str(run), "The sky", "--out", str(tmp_path / "grid.png"), "--html", str(tmp_path / "run.html")]) == 0
    model, tokenizer, _ = load_any(run)
    _, expected = capture_attention(model, tokenizer.encode("The sky")[None])
    weights, labels, roles = read_page(tmp_path / "run.html")
    assert labels == ["T", "h", "e", "␣", "s", "k", "y"] and set(roles) == {"sink", "previous", "self"}
    np.testing.assert_allclose(weights, np.asarray(expected[:, 0]), atol=0.5 / QUANTUM + 1e-6, rtol=0)
    capsys.readouterr()
    assert main(["inspect", str(FIXTURES / "gpt2"), "--induction", "--html", str(tmp_path / "induction.html")]) == 0
    printed = capsys.readouterr().out
    assert "Induction heads" in printed and "layer 0 head" in printed
    weights, labels, roles = read_page(tmp_path / "induction.html")
    half = len(labels) // 2  # gpt2 adds no BOS: the random copy, then the same again
    assert labels[:half] == labels[half:] and set(roles) == {"sink", "previous", "self", "induction"}
    assert main(["inspect", str(FIXTURES / "gpt2")]) == 2
    assert "give a text to look at, or --induction" in capsys.readouterr().err
