"""The attention explorer: one self-contained HTML page of every head's weights on a text.

``jaxattn inspect MODEL "text" --html FILE`` writes it; ``explore(model, tokenizer, text,
path)`` is the same in Python, and ``explorer_page`` builds the page from weights you
already have. The page needs no network and no server: the weights, the token labels, the
head roles and the script are inline, so the file can be mailed or opened offline. On it a
reader picks a layer and a head (or sees all heads of a layer side by side), hovers or
clicks a token to see where it looks (its row of weights) or what looks at it (its
column), and reads each head's role with its score: attention sink, previous token, self,
and, with the induction test, induction.

The weights are stored compactly: a causal map keeps only its lower triangle (row i holds
i + 1 keys), each weight as a 16-bit integer w * 65535 (exact to 1e-5, so the page shows
3 digits right), base64-encoded. GPT-2 small's 12 x 12 heads on 128 tokens take 3.2 MB.

Shape letters: L layers, H heads, T tokens.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from jaxattn.lm.inspection import HeadRoles, capture_attention, head_roles, induction_test

QUANTUM = 65535  # a weight w is stored as round(w * QUANTUM), 16 bits


def encode_weights(weights) -> dict:
    """weights ``[L, H, T, T]`` in [0, 1] -> ``{"packing", "shape", "data"}``: the lower
    triangle (when the maps are causal) or every entry, as little-endian uint16 in base64."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must be [L, H, T, T], got shape {w.shape}")
    if not np.all(np.isfinite(w)) or w.min() < -1e-6 or w.max() > 1 + 1e-6:
        raise ValueError(f"attention weights must lie in [0, 1], got values in [{w.min()}, {w.max()}]")
    T = w.shape[-1]
    causal = not np.any(np.triu(np.abs(w), 1) > 1e-7)
    rows, cols = np.tril_indices(T) if causal else np.indices((T, T)).reshape(2, -1)
    values = np.rint(np.clip(w[..., rows, cols], 0, 1) * QUANTUM).astype("<u2")  # [L, H, entries]
    return {"packing": "lower" if causal else "full", "shape": list(w.shape),
            "data": base64.b64encode(values.tobytes()).decode("ascii")}


def explorer_page(weights, labels, *, title: str, description: str = "", roles: HeadRoles | None = None,
                  induction=None) -> str:
    """The page, as a string. ``weights [L, H, T, T]``; ``labels``: T token labels;
    ``roles``: ``head_roles(weights)`` by default; ``induction``: ``[L, H]`` induction scores
    (from ``induction_test``), marked on the page, or ``None``."""
    weights = np.asarray(weights)
    L, H, T, _ = weights.shape
    if len(labels) != T:
        raise ValueError(f"need {T} token labels for weights {weights.shape}, got {len(labels)}")
    roles = head_roles(weights) if roles is None else roles
    scores = {"sink": roles.first, "previous": roles.previous, "self": roles.itself}
    if induction is not None:
        induction = np.asarray(induction)
        if induction.shape != (L, H):
            raise ValueError(f"induction scores must be [L, H] = [{L}, {H}], got {induction.shape}")
        scores["induction"] = induction
    data = {
        "title": title, "description": description, "labels": [str(label) for label in labels],
        "weights": encode_weights(weights), "quantum": QUANTUM,
        "roles": {name: np.round(np.asarray(values, np.float64), 4).tolist() for name, values in scores.items()},
    }
    payload = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")  # safe inside <script>
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_explorer(path, weights, labels, **kwargs) -> Path:
    """``explorer_page(weights, labels, **kwargs)`` written to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(explorer_page(weights, labels, **kwargs), encoding="utf-8")
    return path


def explore(model, tokenizer, text: str, path, *, induction: bool = False, description: str = "") -> Path:
    """Runs ``model`` on ``text`` and writes its explorer page to ``path``. With
    ``induction=True`` the induction test runs too and the page marks its heads."""
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    if len(tokens) < 3:
        raise ValueError(f"the text {text!r} is {len(tokens)} token(s); the explorer needs at least 3")
    if len(tokens) > model.config.max_length:
        raise ValueError(f"the text is {len(tokens)} tokens, more than the model's context of {model.config.max_length}")
    _, weights = capture_attention(model, tokens[None])
    scores = induction_test(model, tokenizer)[2] if induction else None
    labels = [tokenizer.label(int(t)) for t in tokens]
    return write_explorer(path, np.asarray(weights[:, 0]), labels, title=f"Attention on {text!r}",
                          description=description, induction=scores)


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } .muted { color: #666; }
#controls { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: center; margin: 1em 0; }
#tokens { line-height: 2.6; font-family: ui-monospace, monospace; font-size: 15px; }
.tok { display: inline-block; position: relative; padding: 0 3px; margin: 0 1px; border: 1px solid #ddd;
       border-radius: 3px; cursor: pointer; min-width: 2.4em; text-align: center; }
.tok .w { position: absolute; left: 0; right: 0; top: -1.5em; font-size: 10px; color: #444; line-height: 1; }
.tok.selected { outline: 2px solid #d62728; }
#layout { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
canvas { border: 1px solid #ccc; image-rendering: pixelated; }
#multiples { display: flex; flex-wrap: wrap; gap: 10px; }
#multiples figure { margin: 0; text-align: center; font-size: 12px; cursor: pointer; }
#multiples figure.current canvas { outline: 2px solid #d62728; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
tr.current { background: #ffe8e8; } tbody tr { cursor: pointer; }
td.top { font-weight: bold; color: #b00; }
#info { min-height: 1.5em; margin: 0.6em 0; }
</style></head><body>
<h1 id="title"></h1>
<div id="description" class="muted"></div>
<div id="controls">
  <label>Layer <select id="layer"></select></label>
  <label>Head <select id="head"></select></label>
  <span>Show for the chosen token:
    <label><input type="radio" name="direction" id="dir-from" value="from" checked> where it looks (its row)</label>
    <label><input type="radio" name="direction" id="dir-to" value="to"> what looks at it (its column)</label>
  </span>
</div>
<p class="muted">Hover a token to preview, click it to keep it. The number above each token is the weight
between it and the chosen token in the chosen head.</p>
<div id="tokens"></div>
<div id="info"></div>
<div id="layout">
  <div><div id="single"><canvas id="heatmap"></canvas>
    <div class="muted">rows: queries (the token that looks), columns: keys; click a row to choose its token</div></div>
    <div id="multiples"></div></div>
  <div><h2 style="font-size:1.1em">What each head does</h2>
    <div class="muted">mean weight of the 3rd to the last token on the first token (sink), on the token
      before it (previous) and on itself (self); induction: on the token after the current token's earlier
      occurrence, on random tokens repeated twice. Bold: the 3 strongest heads of each kind.
      Click a row to see that head.</div>
    <table id="roles"><thead></thead><tbody></tbody></table></div>
</div>
<script id="explorer-data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("explorer-data").textContent);
const [L, H, T] = DATA.weights.shape;
const PER_MAP = DATA.weights.packing === "lower" ? T * (T + 1) / 2 : T * T;
const WEIGHTS = (() => {  // every map as float32, unpacked from little-endian uint16
  const bytes = Uint8Array.from(atob(DATA.weights.data), c => c.charCodeAt(0));
  const view = new DataView(bytes.buffer), out = new Float32Array(L * H * PER_MAP);
  for (let i = 0; i < out.length; i++) out[i] = view.getUint16(2 * i, true) / DATA.quantum;
  return out;
})();
function weight(layer, head, query, key) {
  if (key > query && DATA.weights.packing === "lower") return 0;
  const base = (layer * H + head) * PER_MAP;
  return WEIGHTS[base + (DATA.weights.packing === "lower" ? query * (query + 1) / 2 + key : query * T + key)];
}
const state = { layer: 0, head: 0, all: false, token: T - 1, locked: T - 1, direction: "from" };
const $ = id => document.getElementById(id);
$("title").textContent = DATA.title;
$("description").textContent = DATA.description;
for (let l = 0; l < L; l++) $("layer").add(new Option(`layer ${l}`, String(l)));
for (let h = 0; h < H; h++) $("head").add(new Option(`head ${h}`, String(h)));
$("head").add(new Option("all heads", "all"));

const tokens = DATA.labels.map((label, i) => {
  const span = document.createElement("span");
  span.className = "tok"; span.dataset.i = i; span.title = `token ${i}`;
  const w = document.createElement("span"); w.className = "w";
  const text = document.createElement("span"); text.className = "label"; text.textContent = label;
  span.append(w, text);
  span.addEventListener("mouseenter", () => { state.token = i; render(); });
  span.addEventListener("mouseleave", () => { state.token = state.locked; render(); });
  span.addEventListener("click", () => { state.locked = state.token = i; render(); });
  $("tokens").append(span);
  return span;
});

function colour(value) {  // 0 -> white, 1 -> dark blue
  const t = Math.max(0, Math.min(1, value));
  return `rgb(${Math.round(255 - 222 * t)},${Math.round(255 - 180 * t)},${Math.round(255 - 75 * t)})`;
}
function drawMap(canvas, layer, head, cell) {
  canvas.width = canvas.height = T * cell;
  const context = canvas.getContext("2d");
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    context.fillStyle = colour(weight(layer, head, q, k));
    context.fillRect(k * cell, q * cell, cell, cell);
  }
  return context;
}
function value(key) {  // the weight shown for token `key`, given the chosen token
  const t = state.token;
  return state.direction === "from" ? weight(state.layer, state.head, t, key) : weight(state.layer, state.head, key, t);
}
function renderTokens() {
  tokens.forEach((span, i) => {
    const v = value(i);
    span.querySelector(".w").textContent = v.toFixed(3);
    span.dataset.weight = v.toFixed(3);
    span.style.background = colour(v);
    span.style.color = v > 0.55 ? "white" : "#222";
    span.classList.toggle("selected", i === state.token);
  });
  const label = JSON.stringify(DATA.labels[state.token]);
  let best = 0;
  for (let i = 1; i < T; i++) if (value(i) > value(best)) best = i;
  $("info").textContent = (state.direction === "from"
    ? `Layer ${state.layer}, head ${state.head}: token ${state.token} ${label} looks most at token ${best} `
    : `Layer ${state.layer}, head ${state.head}: token ${best} looks most at token ${state.token} ${label}, from `)
    + `${JSON.stringify(DATA.labels[best])} (${value(best).toFixed(3)}).`;
}
function renderSingle() {
  const cell = Math.max(2, Math.floor(480 / T));
  const context = drawMap($("heatmap"), state.layer, state.head, cell);
  context.strokeStyle = "#d62728"; context.lineWidth = 2;
  if (state.direction === "from") context.strokeRect(0, state.token * cell, T * cell, cell);
  else context.strokeRect(state.token * cell, 0, cell, T * cell);
}
function renderMultiples() {
  const box = $("multiples");
  box.replaceChildren();
  if (!state.all) return;
  const cell = Math.max(1, Math.floor(160 / T));
  for (let h = 0; h < H; h++) {
    const figure = document.createElement("figure");
    figure.dataset.head = h;
    figure.classList.toggle("current", h === state.head);
    const canvas = document.createElement("canvas");
    drawMap(canvas, state.layer, h, cell);
    const caption = document.createElement("figcaption");
    caption.textContent = `head ${h}`;
    figure.append(canvas, caption);
    figure.addEventListener("click", () => { state.head = h; state.all = false; $("head").value = String(h); render(); });
    box.append(figure);
  }
}
const KINDS = Object.keys(DATA.roles);
const TOP = {};  // kind -> the three strongest "layer,head"
for (const kind of KINDS) {
  const all = [];
  DATA.roles[kind].forEach((row, l) => row.forEach((v, h) => all.push([v, `${l},${h}`])));
  TOP[kind] = new Set(all.sort((a, b) => b[0] - a[0]).slice(0, 3).map(x => x[1]));
}
function renderRoles() {
  const head = $("roles").tHead, body = $("roles").tBodies[0];
  if (!head.rows.length) {
    const row = head.insertRow();
    for (const name of ["layer", "head", ...KINDS]) row.insertCell().outerHTML = `<th>${name}</th>`;
    for (let l = 0; l < L; l++) for (let h = 0; h < H; h++) {
      const tr = body.insertRow();
      tr.dataset.layer = l; tr.dataset.head = h;
      tr.insertCell().textContent = l; tr.insertCell().textContent = h;
      for (const kind of KINDS) {
        const td = tr.insertCell();
        td.textContent = DATA.roles[kind][l][h].toFixed(2);
        td.dataset.kind = kind;
        if (TOP[kind].has(`${l},${h}`)) td.classList.add("top");
      }
      tr.addEventListener("click", () => {
        state.layer = l; state.head = h; state.all = false;
        $("layer").value = String(l); $("head").value = String(h); render();
      });
    }
  }
  for (const tr of body.rows) tr.classList.toggle("current", +tr.dataset.layer === state.layer && +tr.dataset.head === state.head);
}
function render() {
  $("single").style.display = state.all ? "none" : "";
  renderTokens(); renderSingle(); renderMultiples(); renderRoles();
}
$("layer").addEventListener("change", e => { state.layer = +e.target.value; render(); });
$("head").addEventListener("change", e => {
  state.all = e.target.value === "all";
  if (!state.all) state.head = +e.target.value;
  render();
});
for (const id of ["dir-from", "dir-to"]) $(id).addEventListener("change", e => { state.direction = e.target.value; render(); });
$("heatmap").addEventListener("click", e => {
  const cell = $("heatmap").width / T, rect = $("heatmap").getBoundingClientRect();
  const q = Math.floor((e.clientY - rect.top) / cell * ($("heatmap").height / rect.height));
  if (q >= 0 && q < T) { state.locked = state.token = q; render(); }
});
render();
</script>
</body></html>
"""
