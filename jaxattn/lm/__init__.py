"""Everything a language model needs around the network: tokenizer, data, training,
generation and checkpoints; and looking inside a model (``explore``: its attention explorer
page, shown inline in a notebook)."""

from jaxattn.lm.explorer import ExplorerPage, explore

__all__ = ["ExplorerPage", "explore"]
