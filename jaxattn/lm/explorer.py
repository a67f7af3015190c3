"""The attention explorer: one self-contained HTML page of every head's weights on a text.

``jaxattn inspect MODEL "text" --html FILE`` writes it; ``explore(model, tokenizer, text,
path)`` is the same in Python (and shows the page inline in a notebook), and ``explorer_page``
builds the page from weights you already have. The page needs no network and no server: the weights, the token labels, the
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
from importlib import resources
from pathlib import Path

import numpy as np

from jaxattn.lm.inspection import HeadRoles, capture_attention, head_roles, induction_test

QUANTUM = 65535  # a weight w is stored as round(w * QUANTUM), 16 bits
# The page's HTML, CSS and script, a file shipped with the package; __TITLE__ and __DATA__ are filled in.
TEMPLATE = "explorer.html"


def page_template() -> str:
    """The explorer page's template (``jaxattn/lm/explorer.html``)."""
    return resources.files("jaxattn.lm").joinpath(TEMPLATE).read_text(encoding="utf-8")


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
    return page_template().replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_explorer(path, weights, labels, **kwargs) -> Path:
    """``explorer_page(weights, labels, **kwargs)`` written to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(explorer_page(weights, labels, **kwargs), encoding="utf-8")
    return path


class ExplorerPage:
    """An explorer page: ``html`` (the whole page), ``path`` where it was written (or None).
    In a notebook it shows inline (``_repr_html_``: the page in an ``<iframe srcdoc=...>``,
    sandboxed to run its own script only); ``str(page)`` is the path."""

    def __init__(self, html_text: str, path: Path | None = None, *, height: int = 720):
        self.html, self.path, self.height = html_text, path, height

    def __fspath__(self) -> str:
        if self.path is None:
            raise TypeError("this explorer page was not written to a file (explore(..., path=None))")
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else "<explorer page, not written>"

    def _repr_html_(self) -> str:
        return (f"<iframe srcdoc=\"{html.escape(self.html, quote=True)}\" sandbox=\"allow-scripts\" "
                f"style=\"width: 100%; height: {self.height}px; border: 1px solid #ccc\"></iframe>")


def explore(model, tokenizer, text: str, path=None, *, induction: bool = False, description: str = "") -> ExplorerPage:
    """Runs ``model`` on ``text`` and returns its explorer page (an ``ExplorerPage``: shown
    inline by a notebook), written to ``path`` when one is given. With ``induction=True`` the
    induction test runs too and the page marks its heads."""
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    if len(tokens) < 3:
        raise ValueError(f"the text {text!r} is {len(tokens)} token(s); the explorer needs at least 3")
    if len(tokens) > model.config.max_length:
        raise ValueError(f"the text is {len(tokens)} tokens, more than the model's context of {model.config.max_length}")
    _, weights = capture_attention(model, tokens[None])
    scores = induction_test(model, tokenizer)[2] if induction else None
    labels = [tokenizer.label(int(t)) for t in tokens]
    page = explorer_page(np.asarray(weights[:, 0]), labels, title=f"Attention on {text!r}", description=description,
                         induction=scores)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    return ExplorerPage(page, path)
