"""Formulas for the tour page, as MathML (which browsers render with no script and no network).

A formula is built from a handful of functions, each returning a MathML string:
``frac(row(i("Q"), sup(i("K"), i("T"))), sqrt(i("D")))`` is Q K^T / sqrt(D). ``block``
wraps a formula for display on its own line.
"""

from __future__ import annotations

from html import escape


def i(name: str) -> str:
    """An identifier (a variable or a function name): italic when one letter, as in print."""
    return f"<mi>{escape(name)}</mi>"


def n(number) -> str:
    """A number."""
    return f"<mn>{escape(str(number))}</mn>"


def o(symbol: str) -> str:
    """An operator or a bracket."""
    return f"<mo>{escape(symbol)}</mo>"


def t(words: str) -> str:
    """Words inside a formula (their spaces kept: MathML would trim plain ones)."""
    return f"<mtext>{escape(words).replace(' ', chr(0xA0))}</mtext>"


def row(*parts: str) -> str:
    return "<mrow>" + "".join(parts) + "</mrow>"


def frac(numerator: str, denominator: str) -> str:
    return f"<mfrac>{numerator}{denominator}</mfrac>"


def sqrt(x: str) -> str:
    return f"<msqrt>{x}</msqrt>"


def sub(x: str, index: str) -> str:
    return f"<msub>{x}{index}</msub>"


def sup(x: str, power: str) -> str:
    return f"<msup>{x}{power}</msup>"


def subsup(x: str, index: str, power: str) -> str:
    return f"<msubsup>{x}{index}{power}</msubsup>"


def under(x: str, below: str) -> str:
    """``x`` with ``below`` under it (a sum's range)."""
    return f"<munder>{x}{below}</munder>"


def paren(*parts: str) -> str:
    return row(o("("), *parts, o(")"))


def block(*parts: str) -> str:
    """A displayed formula."""
    return f"<math display='block'>{row(*parts)}</math>"
