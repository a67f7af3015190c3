"""The tour's page: everything it prints, kept in order and written as one ``index.html`` with
its figures and formulas in place; and the small helpers every step shares."""

from __future__ import annotations

import base64
import html
import time
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np



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

    @classmethod
    def _body(cls, items, images=None) -> list[str]:
        """HTML of a section's items; with ``images`` (the figures' folder) the figures are
        embedded as data URLs, so that the HTML stands alone (a notebook's output)."""
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
                if cls._preformatted(item[1]):
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
                source = item[1]
                if images is not None:
                    source = "data:image/png;base64," + base64.b64encode((Path(images) / item[1]).read_bytes()).decode()
                parts.append(f"<figure><img src='{html.escape(source)}' alt='{html.escape(item[2])}'>"
                             f"<figcaption>{html.escape(item[2])}</figcaption></figure>")
            elif item[0] == "math":
                parts.append(item[1])
            elif item[0] == "link":
                parts.append(f"<p class='link'><a href='{html.escape(item[1])}'>{html.escape(item[2])}</a></p>")
        flush()
        return parts

    @classmethod
    def section_html(cls, section: dict, *, images=None) -> str:
        """One section (a step) as HTML: its title, prose, figures and formulas, and its console
        transcript folded; ``images``: embed the figures from that folder (see ``_body``)."""
        title = section["title"]
        if title:
            parts = [f"<section id='step-{title.split('.')[0].split()[-1]}'><h2>{html.escape(title)}</h2>"]
        else:
            parts = ["<section id='introduction'>"]
        parts.extend(cls._body(section["items"], images))
        transcript = "\n".join(section["transcript"]).strip("\n")
        if title and transcript:
            parts.append("<details class='transcript'><summary>What the console printed</summary>"
                         f"<pre>{html.escape(transcript)}</pre></details>")
        parts.append("</section>")
        return "".join(parts)

    def write(self, path) -> Path:
        """The walkthrough as one HTML file: no scripts, no network (the formulas are MathML,
        which browsers draw themselves); the images are the PNG files next to it."""
        parts = [self.section_html(section) for section in self.sections]
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


def heading(say, title: str) -> None:
    say("")
    say(title)
    say("-" * len(title))


def random_matrix(seed: int, shape):
    """Seeded standard-normal numbers (NumPy: the tour needs no compiled sampler)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes once compiled and warm (a second call, timed)."""
    jax.block_until_ready(fn())  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): machines of
    one kind may be an AMD EPYC one day and an Intel Xeon the next."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
